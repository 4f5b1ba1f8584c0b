"""Retry and dead-letter routing: where a failed record goes next, and the headers that travel with it.

A failed record is re-published unchanged (same key and value bytes) to the retry topic with headers
that say which attempt comes next and when it is due; after the last attempt, or at once for a permanent
error, it goes to the dead-letter topic with the same headers. The original topic, partition and offset
stay in the headers across attempts so logs and replays can point at the source record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.settings import Settings

Headers = list[tuple[str, bytes]]

H_ATTEMPT = "cdc-attempt"  # attempts made so far
H_FIRST_FAILURE_MS = "cdc-first-failure-ms"
H_NOT_BEFORE_MS = "cdc-not-before-ms"
H_ERROR_CLASS = "cdc-error-class"
H_ERROR_MESSAGE = "cdc-error-message"
H_ORIGINAL_TOPIC = "cdc-original-topic"
H_ORIGINAL_PARTITION = "cdc-original-partition"
H_ORIGINAL_OFFSET = "cdc-original-offset"
H_PIPELINE = "cdc-pipeline"  # the pipeline that failed it: for logs and `replay-dlq --pipeline`
H_REPLAYED_AT_MS = "cdc-replayed-at-ms"
H_PAYLOAD_DROPPED = "cdc-payload-dropped"  # a reference dead letter: the copy was too large to publish
_MAX_MESSAGE_BYTES = 2000


class Publisher(Protocol):
    async def publish(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        """Return once the broker has acknowledged the record (acks=all)."""
        ...


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class RetryState:
    """What a record's headers say about its earlier failures (nothing, for a fresh source record)."""

    attempts: int
    first_failure_ms: int | None
    not_before_ms: int
    origin: Origin

    @classmethod
    def from_headers(cls, headers: Sequence[tuple[str, bytes]], fallback: Origin) -> RetryState:
        values = {name: value for name, value in headers}

        def number(name: str) -> int | None:
            try:
                return int(values[name])
            except (KeyError, ValueError):
                return None

        try:
            topic = values[H_ORIGINAL_TOPIC].decode()
        except (KeyError, UnicodeDecodeError):
            topic = None
        partition, offset = number(H_ORIGINAL_PARTITION), number(H_ORIGINAL_OFFSET)
        origin = (
            Origin(topic, partition, offset)
            if topic is not None and partition is not None and offset is not None
            else fallback
        )
        return cls(number(H_ATTEMPT) or 0, number(H_FIRST_FAILURE_MS), number(H_NOT_BEFORE_MS) or 0, origin)


@dataclass(frozen=True, slots=True)
class Route:
    topic: str
    headers: Headers
    dead_letter: bool


class RetryPolicy:
    def __init__(self, settings: Settings) -> None:
        self.pipeline = settings.pipeline
        self.retry_topic = settings.retry_topic
        self.dlq_topic = settings.dlq_topic
        self.max_attempts = settings.retry_max_attempts
        self.initial_s = settings.retry_backoff_initial_s
        self.max_s = settings.retry_backoff_max_s

    def backoff_s(self, attempts: int) -> float:
        """Delay before attempt `attempts + 1`: exponential from the initial delay, capped."""
        return float(min(self.initial_s * 2 ** max(attempts - 1, 0), self.max_s))

    def route(
        self, state: RetryState, error_class: ErrorClass, message: str, at_ms: int | None = None
    ) -> Route:
        at_ms = now_ms() if at_ms is None else at_ms
        attempts = state.attempts + 1
        dead = error_class.permanent or attempts >= self.max_attempts
        not_before = at_ms + (0 if dead else int(self.backoff_s(attempts) * 1000))
        headers: Headers = [
            (H_ATTEMPT, str(attempts).encode()),
            (H_FIRST_FAILURE_MS, str(state.first_failure_ms or at_ms).encode()),
            (H_NOT_BEFORE_MS, str(not_before).encode()),
            (H_ERROR_CLASS, error_class.value.encode()),
            (H_ERROR_MESSAGE, message.encode()[:_MAX_MESSAGE_BYTES].decode(errors="ignore").encode()),
            (H_ORIGINAL_TOPIC, state.origin.topic.encode()),
            (H_ORIGINAL_PARTITION, str(state.origin.partition).encode()),
            (H_ORIGINAL_OFFSET, str(state.origin.offset).encode()),
            (H_PIPELINE, self.pipeline.encode()),
        ]
        return Route(self.dlq_topic if dead else self.retry_topic, headers, dead)
