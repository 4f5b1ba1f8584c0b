"""consumer.retry: backoff, routing to the retry or dead-letter topic, and the headers that travel along."""

from __future__ import annotations

import pytest

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.retry import (
    H_ATTEMPT,
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE_MS,
    H_NOT_BEFORE_MS,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    H_PIPELINE,
    Headers,
    RetryPolicy,
    RetryState,
)
from consumer.settings import Settings

SOURCE = Origin("cdc.public.documents", 1, 4242)
RETRY_TOPIC = "cdc-embedder.retry"
DLQ_TOPIC = "cdc-embedder.dlq"
T0 = 1_718_000_000_000

PERMANENT = [c for c in ErrorClass if c.permanent]
TRANSIENT = [c for c in ErrorClass if not c.permanent]


def policy(max_attempts: int = 4, initial_s: float = 2.0, max_s: float = 10.0) -> RetryPolicy:
    return RetryPolicy(
        Settings(
            retry_max_attempts=max_attempts, retry_backoff_initial_s=initial_s, retry_backoff_max_s=max_s
        )
    )


def fresh(origin: Origin = SOURCE) -> RetryState:
    return RetryState.from_headers([], origin)


def as_dict(headers: Headers) -> dict[str, bytes]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), "a header appears twice"
    return dict(headers)


def test_error_classes_split() -> None:
    assert set(PERMANENT) == {
        ErrorClass.INVALID_JSON,
        ErrorClass.INVALID_EVENT,
        ErrorClass.UNKNOWN_OPERATION,
        ErrorClass.MISSING_TEXT,
        ErrorClass.MODEL_REJECTED,
        ErrorClass.DATABASE_REJECTED,
        ErrorClass.NO_PIPELINE,
        ErrorClass.TEXT_TOO_LONG,
    }
    assert set(TRANSIENT) == {
        ErrorClass.MODEL_ERROR,
        ErrorClass.MODEL_OUT_OF_MEMORY,
        ErrorClass.MODEL_UNAVAILABLE,
        ErrorClass.DATABASE_UNAVAILABLE,
        ErrorClass.TIMEOUT,
    }


@pytest.mark.parametrize(
    ("attempts", "delay"), [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (5, 10.0), (40, 10.0)]
)
def test_backoff_grows_and_is_capped(attempts: int, delay: float) -> None:
    assert policy().backoff_s(attempts) == delay


def test_backoff_with_default_settings() -> None:
    p = RetryPolicy(Settings())
    assert [p.backoff_s(n) for n in range(1, 11)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_policy_topics_come_from_settings() -> None:
    p = policy()
    assert (p.retry_topic, p.dlq_topic, p.max_attempts) == (RETRY_TOPIC, DLQ_TOPIC, 4)


@pytest.mark.parametrize("error_class", PERMANENT)
def test_permanent_error_goes_to_the_dlq_at_once(error_class: ErrorClass) -> None:
    route = policy().route(fresh(), error_class, "bad event", at_ms=T0)
    assert route.topic == DLQ_TOPIC
    assert route.dead_letter is True
    assert as_dict(route.headers) == {
        H_ATTEMPT: b"1",
        H_FIRST_FAILURE_MS: str(T0).encode(),
        H_NOT_BEFORE_MS: str(T0).encode(),
        H_ERROR_CLASS: error_class.value.encode(),
        H_ERROR_MESSAGE: b"bad event",
        H_ORIGINAL_TOPIC: b"cdc.public.documents",
        H_ORIGINAL_PARTITION: b"1",
        H_ORIGINAL_OFFSET: b"4242",
        H_PIPELINE: b"documents",
    }


@pytest.mark.parametrize("error_class", TRANSIENT)
def test_transient_error_goes_to_the_retry_topic(error_class: ErrorClass) -> None:
    route = policy().route(fresh(), error_class, "busy", at_ms=T0)
    assert (route.topic, route.dead_letter) == (RETRY_TOPIC, False)
    headers = as_dict(route.headers)
    assert headers[H_ATTEMPT] == b"1"
    assert headers[H_NOT_BEFORE_MS] == str(T0 + 2000).encode()
    assert headers[H_ERROR_CLASS] == error_class.value.encode()


def test_transient_error_retries_until_max_attempts_then_dead_letters() -> None:
    """Feed each route's headers back as the next attempt's record (read from the retry topic)."""
    p = policy(max_attempts=4)
    state = fresh()
    seen: list[tuple[str, bytes, int]] = []
    for n in range(4):
        at = T0 + n * 60_000
        route = p.route(state, ErrorClass.MODEL_ERROR, f"failure {n + 1}", at_ms=at)
        headers = as_dict(route.headers)
        seen.append((route.topic, headers[H_ATTEMPT], int(headers[H_NOT_BEFORE_MS]) - at))
        # the original position travels across attempts, whatever the retry record's own position is
        assert headers[H_ORIGINAL_TOPIC] == b"cdc.public.documents"
        assert headers[H_ORIGINAL_PARTITION] == b"1"
        assert headers[H_ORIGINAL_OFFSET] == b"4242"
        assert headers[H_FIRST_FAILURE_MS] == str(T0).encode()
        assert headers[H_ERROR_MESSAGE] == f"failure {n + 1}".encode()
        state = RetryState.from_headers(route.headers, Origin(RETRY_TOPIC, 0, 900 + n))
        assert state.origin == SOURCE
        assert state.attempts == n + 1
    assert seen == [
        (RETRY_TOPIC, b"1", 2000),
        (RETRY_TOPIC, b"2", 4000),
        (RETRY_TOPIC, b"3", 8000),
        (DLQ_TOPIC, b"4", 0),
    ]


def test_single_attempt_dead_letters_a_transient_error_at_once() -> None:
    route = policy(max_attempts=1, initial_s=1.0).route(fresh(), ErrorClass.TIMEOUT, "slow", at_ms=T0)
    assert (route.topic, route.dead_letter) == (DLQ_TOPIC, True)


def test_permanent_error_on_a_retried_record_keeps_its_history() -> None:
    p = policy()
    first = p.route(fresh(), ErrorClass.MODEL_ERROR, "oom-ish", at_ms=T0)
    state = RetryState.from_headers(first.headers, Origin(RETRY_TOPIC, 0, 3))
    route = p.route(state, ErrorClass.DATABASE_REJECTED, "rejected", at_ms=T0 + 5000)
    headers = as_dict(route.headers)
    assert route.topic == DLQ_TOPIC
    assert headers[H_ATTEMPT] == b"2"
    assert headers[H_FIRST_FAILURE_MS] == str(T0).encode()
    assert headers[H_NOT_BEFORE_MS] == str(T0 + 5000).encode()
    assert headers[H_ORIGINAL_OFFSET] == b"4242"


def test_route_defaults_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumer.retry.now_ms", lambda: 123_456)
    headers = as_dict(policy().route(fresh(), ErrorClass.MODEL_ERROR, "x").headers)
    assert headers[H_FIRST_FAILURE_MS] == b"123456"
    assert headers[H_NOT_BEFORE_MS] == b"125456"


def test_long_message_is_cut_to_2000_bytes() -> None:
    route = policy().route(fresh(), ErrorClass.MODEL_ERROR, "e" * 10_000, at_ms=T0)
    assert as_dict(route.headers)[H_ERROR_MESSAGE] == b"e" * 2000


# --- RetryState.from_headers ---------------------------------------------------------------------


def test_from_headers_round_trip() -> None:
    headers: Headers = [
        (H_ATTEMPT, b"3"),
        (H_FIRST_FAILURE_MS, b"1718000000000"),
        (H_NOT_BEFORE_MS, b"1718000008000"),
        (H_ERROR_CLASS, b"model_error"),
        (H_ORIGINAL_TOPIC, b"cdc.public.documents"),
        (H_ORIGINAL_PARTITION, b"2"),
        (H_ORIGINAL_OFFSET, b"77"),
        ("traceparent", b"00-abc-def-01"),
    ]
    state = RetryState.from_headers(headers, Origin(RETRY_TOPIC, 0, 5))
    assert state == RetryState(3, 1_718_000_000_000, 1_718_000_008_000, Origin("cdc.public.documents", 2, 77))


def test_from_headers_fresh_record_uses_the_fallback() -> None:
    assert fresh() == RetryState(0, None, 0, SOURCE)


@pytest.mark.parametrize(
    "headers",
    [
        [(H_ORIGINAL_TOPIC, b"cdc.public.documents")],
        [(H_ORIGINAL_TOPIC, b"t"), (H_ORIGINAL_PARTITION, b"1")],
        [(H_ORIGINAL_TOPIC, b"t"), (H_ORIGINAL_PARTITION, b"x"), (H_ORIGINAL_OFFSET, b"3")],
        [(H_ORIGINAL_PARTITION, b"1"), (H_ORIGINAL_OFFSET, b"3")],
    ],
    ids=["topic-only", "no-offset", "garbled-partition", "no-topic"],
)
def test_from_headers_incomplete_origin_falls_back(headers: Headers) -> None:
    assert RetryState.from_headers(headers, SOURCE).origin == SOURCE


def test_from_headers_garbled_numbers() -> None:
    headers: Headers = [(H_ATTEMPT, b"three"), (H_FIRST_FAILURE_MS, b""), (H_NOT_BEFORE_MS, b"soon")]
    assert RetryState.from_headers(headers, SOURCE) == RetryState(0, None, 0, SOURCE)


def test_from_headers_non_utf8_topic_falls_back() -> None:
    headers: Headers = [
        (H_ORIGINAL_TOPIC, b"\xff\xfe"),
        (H_ORIGINAL_PARTITION, b"1"),
        (H_ORIGINAL_OFFSET, b"3"),
    ]
    assert RetryState.from_headers(headers, SOURCE).origin == SOURCE
