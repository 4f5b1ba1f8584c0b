"""One micro-batch from records to outcomes: decode, collapse, skip what is unchanged, embed, write, route.

No Kafka client in here, only the `Embedder`, `Sink` and `Publisher` protocols, so the whole decision
logic runs in unit tests with small fakes. Every record ends in exactly one outcome of
`consumer.metrics.OUTCOMES`; database outages propagate to the caller, which holds the batch and retries.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from consumer import metrics
from consumer.batching import collapse
from consumer.embedder import Embedder, Embedding, Vector
from consumer.errors import ErrorClass, EventError, classify
from consumer.events import Change, Op, Origin, decode, op_label
from consumer.retry import Publisher, RetryPolicy, RetryState, Route
from consumer.settings import Settings
from consumer.sink import Sink, Stored, WriteBatch, text_hash


class Record(Protocol):
    """The fields of aiokafka's ConsumerRecord that a batch needs."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int: ...  # ms; for source records, when Connect produced them


@dataclass(slots=True)
class Failure:
    record: Record
    state: RetryState
    op: str
    error_class: ErrorClass
    message: str


@dataclass(slots=True)
class BatchReport:
    outcomes: Tally[str] = field(default_factory=Tally)
    embedded_texts: int = 0
    model_s: float = 0.0
    db_s: float = 0.0
    written_rows: int = 0
    failures: list[tuple[Failure, Route]] = field(default_factory=list)


WRITTEN = frozenset({"embedded", "unchanged", "deleted"})  # outcomes whose write is a freshness sample


@dataclass(slots=True)
class _Decoded:
    change: Change
    record: Record
    state: RetryState


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        sink: Sink,
        publisher: Publisher,
        executor: Executor | None = None,
    ) -> None:
        self._settings = settings
        self._embedder = embedder
        self._sink = sink
        self._publisher = publisher
        self._policy = RetryPolicy(settings)
        self._executor = executor

    async def process(self, records: Sequence[Record]) -> BatchReport:
        """Apply the batch. Raises only when the database or broker is unreachable (nothing committed).

        Outcomes are counted only once the batch is written, so a batch re-applied after a failed write
        is counted once.
        """
        report = BatchReport()
        failures: list[Failure] = []
        outcomes: list[tuple[_Decoded, str]] = []
        decoded = self._decode(records, failures)
        live = [d for d in decoded if d.change.op is not Op.TOMBSTONE]
        outcomes += [(d, "ignored") for d in decoded if d.change.op is Op.TOMBSTONE]
        winners, losers = collapse(d.change for d in live)
        by_change = {id(d.change): d for d in live}
        outcomes += [(by_change[id(c)], "superseded") for c in losers]

        started = time.perf_counter()
        stored = await self._sink.stored(list(winners))
        lookups = [k for k, c in winners.items() if c.needs_text_lookup and not _older(c, stored.get(k))]
        current = await self._sink.source_texts(lookups)
        report.db_s += time.perf_counter() - started

        batch = WriteBatch()
        to_embed: list[tuple[_Decoded, str, bytes]] = []
        for key, change in winners.items():
            item = by_change[id(change)]
            previous = stored.get(key)
            if _older(change, previous):
                outcomes.append((item, "superseded"))
                continue
            if change.is_delete:
                batch.deletes.append((key, change.position, change.source_ts_ms))
                outcomes.append((item, "deleted"))
                continue
            text = change.text if change.text is not None else current.get(key)
            if text is None:  # the row is gone; its delete event follows
                outcomes.append((item, "superseded"))
                continue
            if isinstance(text, EventError):
                failures.append(self._failure(item.record, item.state, text.error_class, str(text)))
                continue
            digest = text_hash(self._embedder.name, text)
            if previous is not None and not previous.deleted and previous.text_sha256 == digest:
                batch.touches.append((key, change.position, change.source_ts_ms))
                outcomes.append((item, "unchanged"))
            else:
                to_embed.append((item, text, digest))

        if to_embed:
            vectors, errors = await self._embed_all([t for _, t, _ in to_embed], report)
            for index, (item, _, digest) in enumerate(to_embed):
                vector = vectors[index]
                if vector is None:
                    failures.append(self._failure(item.record, item.state, *errors[index]))
                    continue
                change = item.change
                batch.upserts.append((change.key, vector, digest, change.position, change.source_ts_ms))
                outcomes.append((item, "embedded"))

        started = time.perf_counter()
        report.written_rows = await self._sink.write(batch)
        report.db_s += time.perf_counter() - started
        committed_at = time.time()
        for item, outcome in outcomes:
            self._count(report, [item], outcome)
            if outcome in WRITTEN and item.change.source_ts_ms is not None:
                self._observe_freshness(item, committed_at, item.change.source_ts_ms / 1000)
        await self._route(failures, report)
        return report

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport:
        """Route one record straight to its next topic (the dead-letter topic for permanent errors)."""
        report = BatchReport()
        state = RetryState.from_headers(
            record.headers or (), Origin(record.topic, record.partition, record.offset)
        )
        await self._route([self._failure(record, state, error_class, message)], report)
        return report

    def _decode(self, records: Sequence[Record], failures: list[Failure]) -> list[_Decoded]:
        s = self._settings
        decoded = []
        for record in records:
            state = RetryState.from_headers(
                record.headers or (), Origin(record.topic, record.partition, record.offset)
            )
            try:
                change = decode(
                    record.key, record.value, state.origin, s.key_column, s.text_column_list, s.max_text_chars
                )
            except EventError as exc:
                failures.append(self._failure(record, state, exc.error_class, str(exc)))
                continue
            decoded.append(_Decoded(change, record, state))
        return decoded

    async def _embed_all(
        self, texts: list[str], report: BatchReport
    ) -> tuple[list[Vector | None], dict[int, tuple[ErrorClass, str]]]:
        """Embed the batch; if it fails, embed text by text so that only the failing ones are retried."""
        started = time.perf_counter()
        results: list[Vector | None] = []
        errors: dict[int, tuple[ErrorClass, str]] = {}
        try:
            embedding = await self._run_model(texts)
            results = list(embedding.vectors)
            self._account(embedding, report)
        except Exception:
            for index, text in enumerate(texts):
                try:
                    single = await self._run_model([text])
                except Exception as exc:
                    results.append(None)
                    errors[index] = (classify(exc), f"{type(exc).__name__}: {exc}")
                    continue
                results.append(single.vectors[0])
                self._account(single, report)
        report.model_s += time.perf_counter() - started
        return results, errors

    async def _run_model(self, texts: list[str]) -> Embedding:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embedder.embed, texts)

    def _observe_freshness(self, item: _Decoded, committed_at: float, source_at: float) -> None:
        metrics.END_TO_END_SECONDS.observe(max(committed_at - source_at, 0.0))
        # a retry record's timestamp is its republication, not its capture
        if item.record.topic == self._settings.source_topic:
            metrics.CAPTURE_SECONDS.observe(max(item.record.timestamp / 1000 - source_at, 0.0))

    @staticmethod
    def _account(embedding: Embedding, report: BatchReport) -> None:
        report.embedded_texts += len(embedding.vectors)
        metrics.TEXTS_EMBEDDED.inc(len(embedding.vectors))
        metrics.TOKENS_EMBEDDED.inc(embedding.tokens)
        metrics.TEXTS_TRUNCATED.inc(embedding.truncated)

    def _failure(self, record: Record, state: RetryState, error_class: ErrorClass, message: str) -> Failure:
        return Failure(record, state, op_label(record.value), error_class, message)

    async def _route(self, failures: list[Failure], report: BatchReport) -> None:
        routes = [(f, self._policy.route(f.state, f.error_class, f.message)) for f in failures]
        await asyncio.gather(
            *(self._publisher.publish(r.topic, f.record.key, f.record.value, r.headers) for f, r in routes)
        )
        for failure, route in routes:
            outcome = "dead_lettered" if route.dead_letter else "retried"
            (metrics.DEAD_LETTERS if route.dead_letter else metrics.RETRIES).labels(
                error_class=failure.error_class.value
            ).inc()
            metrics.count_event(failure.op, outcome)
            report.outcomes[outcome] += 1
        report.failures = routes

    @staticmethod
    def _count(report: BatchReport, items: Sequence[_Decoded], outcome: str) -> None:
        for item in items:
            metrics.count_event(item.change.op.label, outcome)
            report.outcomes[outcome] += 1


def _older(change: Change, stored: Stored | None) -> bool:
    """True when the table already holds this change or a newer one of the key."""
    return stored is not None and change.position <= stored.position
