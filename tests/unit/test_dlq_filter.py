"""consumer.dlq.ReplayFilter: which dead letters a replay re-publishes."""

from __future__ import annotations

import pytest

from consumer.dlq import ReplayFilter
from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.retry import H_ERROR_CLASS, H_FIRST_FAILURE_MS, RetryPolicy, RetryState
from consumer.settings import Settings

T = 1_718_000_000_000


def dead_letter(
    error_class: str | None = "model_error", first_failure_ms: int | None = T
) -> dict[str, bytes]:
    headers = {"cdc-attempt": b"5", "cdc-original-topic": b"cdc.public.documents"}
    if error_class is not None:
        headers[H_ERROR_CLASS] = error_class.encode()
    if first_failure_ms is not None:
        headers[H_FIRST_FAILURE_MS] = str(first_failure_ms).encode()
    return headers


@pytest.mark.parametrize(
    "headers",
    [dead_letter(), dead_letter("invalid_json", 1), {}, {H_FIRST_FAILURE_MS: b"garbage"}],
)
def test_no_filter_matches_everything(headers: dict[str, bytes]) -> None:
    assert ReplayFilter().matches(headers) is True


@pytest.mark.parametrize(
    ("wanted", "headers", "matches"),
    [
        ("model_error", dead_letter("model_error"), True),
        ("model_error", dead_letter("model_out_of_memory"), False),
        ("model_error", dead_letter("MODEL_ERROR"), False),
        ("model_error", dead_letter(None), False),
        ("", dead_letter(None), True),  # an explicit empty class matches records without one
    ],
)
def test_error_class(wanted: str, headers: dict[str, bytes], matches: bool) -> None:
    assert ReplayFilter(error_class=wanted).matches(headers) is matches


@pytest.mark.parametrize(
    ("since", "until", "failed", "matches"),
    [
        (T, None, T, True),  # bounds are inclusive
        (T, None, T - 1, False),
        (T, None, T + 1, True),
        (None, T, T, True),
        (None, T, T + 1, False),
        (None, T, T - 1, True),
        (T - 10, T + 10, T, True),
        (T - 10, T + 10, T - 11, False),
        (T - 10, T + 10, T + 11, False),
        (T, T, T, True),
        (T + 1, T - 1, T, False),  # an empty window matches nothing
    ],
)
def test_time_window(since: int | None, until: int | None, failed: int, matches: bool) -> None:
    assert (
        ReplayFilter(since_ms=since, until_ms=until).matches(dead_letter(first_failure_ms=failed)) is matches
    )


@pytest.mark.parametrize("first_failure", [None, b"garbage", b""])
def test_unknown_failure_time_counts_as_zero(first_failure: bytes | None) -> None:
    headers = dead_letter(first_failure_ms=None)
    if first_failure is not None:
        headers[H_FIRST_FAILURE_MS] = first_failure
    assert ReplayFilter(since_ms=1).matches(headers) is False
    assert ReplayFilter(until_ms=T).matches(headers) is True
    assert ReplayFilter(since_ms=0, until_ms=0).matches(headers) is True


def test_class_and_window_combined() -> None:
    keep = ReplayFilter(error_class="timeout", since_ms=T - 1000, until_ms=T + 1000)
    assert keep.matches(dead_letter("timeout", T)) is True
    assert keep.matches(dead_letter("model_error", T)) is False
    assert keep.matches(dead_letter("timeout", T + 5000)) is False


def test_matches_headers_written_by_the_retry_policy() -> None:
    route = RetryPolicy(Settings()).route(
        RetryState.from_headers([], Origin("cdc.public.documents", 0, 1)),
        ErrorClass.INVALID_JSON,
        "value is not valid JSON",
        at_ms=T,
    )
    headers = dict(route.headers)
    assert ReplayFilter(error_class="invalid_json", since_ms=T, until_ms=T).matches(headers) is True
    assert ReplayFilter(error_class="model_error").matches(headers) is False
    assert ReplayFilter(since_ms=T + 1).matches(headers) is False


def test_pipeline_filter_keeps_what_that_pipeline_failed() -> None:
    route = RetryPolicy(Settings(pipeline_name="tickets")).route(
        RetryState(0, None, 0, Origin("cdc.support.tickets", 0, 1)), ErrorClass.INVALID_JSON, "bad"
    )
    headers = dict(route.headers)
    assert ReplayFilter(pipeline="tickets").matches(headers) is True
    assert ReplayFilter(pipeline="documents").matches(headers) is False
    assert ReplayFilter(pipeline="tickets").matches(dead_letter()) is False  # older ones carry no pipeline
