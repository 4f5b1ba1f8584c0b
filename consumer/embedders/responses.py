"""What an embedding server's answer means: vectors, one input refused, slow down, try again, or an
operator must fix a setting. OpenAI's documented statuses and headers; TEI, vLLM, Infinity and Ollama
answer in the same shape (Infinity and vLLM with FastAPI's 422 for a body they refuse).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

from consumer import metrics
from consumer.errors import Backpressure, EmbedderConfigError, TransientEmbedError
from consumer.settings import env_name

if TYPE_CHECKING:
    from consumer.embedders.openai import OpenAIEmbedderSpec

DEFAULT_RETRY_AFTER_S = 1.0  # a 429 that says nothing about when
MAX_RETRY_AFTER_S = 60.0  # a longer hint is waited in steps, each re-checked with the server
# A hint of 0 (or a date past) would make a busy loop of 429s that never adds up to the batch's
# patience (model_calls.BACKPRESSURE_IN_PLACE_S): every wait is at least this long.
MIN_RETRY_AFTER_S = 0.1
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Rejected:
    """The server refused the request's input(s) on their own merits (400, 413, 422)."""

    reason: str


def check_response(response: httpx.Response, spec: OpenAIEmbedderSpec) -> dict[str, Any] | Rejected:
    """The JSON body of a success, a `Rejected`, or the failure raised with its class."""
    status = response.status_code
    if status == 200:
        try:
            body: dict[str, Any] = response.json()
        except ValueError as exc:
            raise TransientEmbedError(f"the server answered 200 with no JSON body ({exc})") from exc
        return body
    reason = error_message(response)
    if status == 429:
        if "quota" in reason.lower():  # OpenAI's insufficient_quota: waiting does not help, billing does
            raise EmbedderConfigError(
                f"429 {reason}", f"raise the quota of the account of {env_name('openai_api_key')}"
            )
        metrics.EMBED_RATE_LIMITED.inc()
        raise Backpressure(retry_after_s(response.headers), f"429 {reason}")
    if status in (401, 403):
        raise EmbedderConfigError(
            f"{status} {reason}",
            f"set a valid key in {env_name('openai_api_key')} (or {env_name('openai_api_key_file')})",
        )
    if status == 404 or _about_configuration(reason):
        raise EmbedderConfigError(
            f"{status} {reason}",
            f"check {env_name('openai_model')}, {env_name('openai_dimensions')} and "
            f"{env_name('openai_base_url')} ({spec.shown_url}) against what the server serves",
        )
    if status in (400, 413, 422):
        return Rejected(f"{status} {reason}")
    if status in (408, 409) or status >= 500:
        raise TransientEmbedError(f"{status} {reason}")
    raise EmbedderConfigError(f"{status} {reason}", f"check {env_name('openai_base_url')} ({spec.shown_url})")


def _about_configuration(reason: str) -> bool:
    """A 400 that is about the model or the dimensions, not about an input."""
    said = reason.lower()
    return (
        ("model" in said and ("not found" in said or "does not exist" in said))
        or "dimension" in said
        or "matryoshka" in said
    )


def error_message(response: httpx.Response) -> str:
    """The server's own words, from OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}` or TEI's
    `{"error"}`; the raw text (shortened) otherwise."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for field in ("error", "detail", "message"):
            if body.get(field):
                return str(body[field])[:300]
    return str(body)[:300]


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float:
    """How long the server asks us to wait: `retry-after-ms`, `retry-after` (seconds or an HTTP date),
    else the reset of whichever `x-ratelimit-remaining-*` is spent; capped at MAX_RETRY_AFTER_S."""
    wait: float | None = None
    if "retry-after-ms" in headers:
        wait = _number(headers["retry-after-ms"], 0.001)
    if wait is None and "retry-after" in headers:
        value = headers["retry-after"]
        wait = _number(value, 1.0)
        if wait is None:
            try:
                wait = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        resets = [
            duration_s(headers.get(f"x-ratelimit-reset-{kind}", ""))
            for kind in ("requests", "tokens")
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0"
        ]
        wait = max((r for r in resets if r is not None), default=None)
    return min(max(wait if wait is not None else DEFAULT_RETRY_AFTER_S, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


def duration_s(value: str) -> float | None:
    """OpenAI's reset durations: `20ms`, `1s`, `6m0s`, `1h2m3.5s`."""
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _number(value: str, unit_s: float) -> float | None:
    try:
        return float(value) * unit_s
    except ValueError:
        return None
