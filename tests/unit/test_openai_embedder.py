"""The openai backend against httpx's MockTransport: request splitting, limits, headers, classification."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from consumer.embedders.limits import estimated_tokens, plan_requests, truncate_to_tokens
from consumer.embedders.openai import OpenAIEmbedder, OpenAIEmbedderSpec, identity
from consumer.embedders.responses import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, duration_s, retry_after_s
from consumer.errors import Backpressure, EmbedderConfigError, TransientEmbedError

DIM = 3
Handler = Callable[[httpx.Request], httpx.Response]


def ok(request: httpx.Request) -> httpx.Response:
    inputs = json.loads(request.content)["input"]
    data = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(inputs)]
    return httpx.Response(200, json={"data": data[::-1], "usage": {"prompt_tokens": 7, "total_tokens": 7}})


def backend(handler: Handler, **spec: Any) -> tuple[OpenAIEmbedder, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append({"body": json.loads(request.content), "auth": request.headers.get("authorization")})
        return handler(request)

    embedder = OpenAIEmbedder(OpenAIEmbedderSpec(model="m", dimensions=DIM, **spec))
    embedder._client = httpx.Client(base_url=embedder._client.base_url, transport=httpx.MockTransport(record))
    return embedder, seen


def test_vectors_come_back_in_input_order_normalised_with_usage() -> None:
    embedder, seen = backend(ok, api_key="sk-test", max_inputs_per_request=2)
    result = embedder.embed(["a", "bbb", "cc"])
    assert [len(s["body"]["input"]) for s in seen] == [2, 1]
    assert all(s["body"]["encoding_format"] == "float" and s["body"]["dimensions"] == DIM for s in seen)
    assert seen[0]["auth"] == "Bearer sk-test"
    expected = np.array([[1, 1, 0], [3, 1, 0], [2, 1, 0]], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(result.vectors, expected, rtol=1e-6)
    assert result.tokens == 14 and not result.rejected


def test_base64_vectors_are_decoded() -> None:
    def b64(request: httpx.Request) -> httpx.Response:
        import base64

        raw = base64.b64encode(np.array([0.0, 3.0, 4.0], dtype="<f4").tobytes()).decode()
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": raw}], "usage": {}})

    embedder, _ = backend(b64, encoding_format="base64")
    np.testing.assert_allclose(embedder.embed(["x"]).vectors[0], [0.0, 0.6, 0.8], rtol=1e-6)


def test_identity_names_host_model_and_dimension() -> None:
    spec = OpenAIEmbedderSpec(model="text-embedding-3-small", base_url="https://api.openai.com/v1")
    assert identity(spec, 512) == "openai:api.openai.com/v1/text-embedding-3-small@512"


def test_requests_respect_input_and_token_limits() -> None:
    texts = ["x" * 10, "y" * 10, "z" * 10, "w" * 100]  # 5, 5, 5 and 50 estimated tokens
    assert plan_requests(texts, max_inputs=2, max_tokens=1000) == [[0, 1], [2, 3]]
    assert plan_requests(texts, max_inputs=10, max_tokens=12) == [[0, 1], [2], [3]]
    assert estimated_tokens("é" * 10) == 10  # 20 bytes


def test_a_long_input_is_truncated_at_a_character_boundary_and_counted() -> None:
    assert truncate_to_tokens("ab" * 10, 3) == "abcabc"[:0] + "ababab"
    assert truncate_to_tokens("é" * 10, 3) == "é" * 3
    embedder, seen = backend(ok, max_tokens_per_input=4)
    assert embedder.embed(["short", "x" * 100]).truncated == 1
    assert seen[0]["body"]["input"][1] == "x" * 8


def test_a_400_for_several_inputs_is_asked_input_by_input_and_only_the_bad_one_rejected() -> None:
    def refuse_poison(request: httpx.Request) -> httpx.Response:
        if "poison" in json.loads(request.content)["input"]:
            return httpx.Response(400, json={"error": {"message": "input too long", "code": None}})
        return ok(request)

    embedder, seen = backend(refuse_poison)
    result = embedder.embed(["fine", "poison", "ok"])
    assert result.rejected == {1: "400 input too long"}
    assert len(seen) == 4  # the batch, then each input on its own
    assert result.vectors[0].any() and result.vectors[2].any() and not result.vectors[1].any()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "Wed, 02 Dec 2026 13:00:10 GMT"}, 10.0),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"}, MAX_RETRY_AFTER_S),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "120ms"}, 0.12),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "9s"}, 1.0),
        ({}, 1.0),
        ({"retry-after": "0"}, MIN_RETRY_AFTER_S),  # never a busy loop of 429s
        ({"retry-after": "Wed, 02 Dec 2026 12:59:00 GMT"}, MIN_RETRY_AFTER_S),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float) -> None:
    now = 1_796_216_400.0  # Wed, 02 Dec 2026 13:00:00 GMT
    assert retry_after_s(httpx.Headers(headers), now) == pytest.approx(expected)


def test_durations() -> None:
    assert duration_s("6m0s") == 360 and duration_s("1h2m3.5s") == 3723.5 and duration_s("20ms") == 0.02
    assert duration_s("soon") is None


def status(code: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(code, json=body or {"detail": "nope"}, headers=headers)


def test_429_is_backpressure_with_the_servers_wait() -> None:
    embedder, _ = backend(status(429, headers={"retry-after": "2"}))
    with pytest.raises(Backpressure) as caught:
        embedder.embed(["a"])
    assert caught.value.retry_after_s == 2.0


def test_a_validation_error_that_echoes_an_input_refuses_that_input_and_holds_nothing() -> None:
    """A server's 422 may quote the input it refuses: words like "dimension" in it are not about the
    settings when the probe text embeds with the same settings."""

    def echo(request: httpx.Request) -> httpx.Response:
        inputs = json.loads(request.content)["input"]
        if any("dimension" in t and t != "dimension probe" for t in inputs):
            return httpx.Response(422, json={"detail": f"input {inputs!r} is not valid"})
        return ok(request)

    embedder, seen = backend(echo)
    result = embedder.embed(["fine", "a text on dimension reduction"])
    assert list(result.rejected) == [1] and "422" in result.rejected[1]
    assert result.vectors[0].any() and not result.vectors[1].any()
    assert [r["body"]["input"] for r in seen][-1] == ["dimension probe"]


@pytest.mark.parametrize(
    ("handler", "setting"),
    [
        (status(401), "CDC_OPENAI_API_KEY"),
        (status(403), "CDC_OPENAI_API_KEY"),
        (status(404, {"error": {"message": "The model `m` does not exist"}}), "CDC_OPENAI_MODEL"),
        (status(400, {"error": {"message": "matryoshka_dim=999 is not in a valid range"}}), "DIMENSIONS"),
        (status(429, {"error": {"message": "You exceeded your current quota"}}), "quota"),
    ],
)
def test_configuration_errors_name_the_setting(handler: Handler, setting: str) -> None:
    embedder, _ = backend(handler, api_key="sk-secret-value")
    with pytest.raises(EmbedderConfigError) as caught:
        embedder.embed(["a"])
    assert setting in caught.value.fix
    assert "sk-secret-value" not in str(caught.value) + caught.value.fix


def test_a_wrong_dimension_is_a_configuration_error() -> None:
    embedder, _ = backend(ok)
    embedder.dimension = 384
    with pytest.raises(EmbedderConfigError, match="3 dimensions, not 384"):
        embedder.embed(["a"])


@pytest.mark.parametrize("code", [500, 502, 503, 408])
def test_server_errors_are_transient(code: int) -> None:
    embedder, _ = backend(status(code))
    with pytest.raises(TransientEmbedError):
        embedder.embed(["a"])


@pytest.mark.parametrize(
    ("failure", "unreachable"),
    [
        (httpx.ReadError("connection reset by peer"), False),  # it answered before: this request failed
        (httpx.ConnectError("connection refused"), True),  # the server is down
        (httpx.ConnectTimeout("timed out"), True),
    ],
)
def test_connection_failures_are_transient_and_say_whether_the_server_was_reached(
    failure: httpx.TransportError, unreachable: bool
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    embedder, _ = backend(fail)
    with pytest.raises(TransientEmbedError, match=type(failure).__name__) as raised:
        embedder.embed(["a"])
    assert raised.value.unreachable is unreachable


def test_an_operator_error_wins_over_a_rate_limit_among_concurrent_requests() -> None:
    both_sent = threading.Barrier(2)

    def mixed(request: httpx.Request) -> httpx.Response:
        both_sent.wait()  # neither answers before both are in flight
        if json.loads(request.content)["input"] == ["a"]:
            return httpx.Response(429, headers={"retry-after": "1"})
        return httpx.Response(401, json={"detail": "Unauthorized"})

    embedder, _ = backend(mixed, max_inputs_per_request=1, concurrency=2)  # both in flight
    with pytest.raises(EmbedderConfigError):
        embedder.embed(["a", "b"])


def test_the_dimension_is_probed_when_not_configured() -> None:
    spec = OpenAIEmbedderSpec(model="m", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(TransientEmbedError):  # nothing listens there: the probe fails at start
        OpenAIEmbedder(spec)


def test_a_password_in_the_base_url_never_reaches_an_error_or_log() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    embedder, _ = backend(refused, base_url="http://user:s3cret@tei.gpu:8080/v1")
    with pytest.raises(TransientEmbedError) as raised:
        embedder.embed(["a"])
    assert "tei.gpu:8080/v1" in str(raised.value) and "s3cret" not in str(raised.value)
    embedder, _ = backend(status(404), base_url="http://user:s3cret@tei.gpu:8080/v1")
    with pytest.raises(EmbedderConfigError) as wrong:
        embedder.embed(["a"])
    assert "s3cret" not in f"{wrong.value} {wrong.value.fix}"
