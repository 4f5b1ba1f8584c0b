"""One micro-batch from records to outcomes: decode, collapse, skip what is unchanged, embed, write, route.

No Kafka client in here, only the `Embedder`, `Sink` and `Publisher` protocols, so the whole decision
logic runs in unit tests with small fakes. Every record ends in exactly one outcome of
`consumer.metrics.OUTCOMES`; database outages propagate to the caller, which holds the batch and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from consumer import metrics
from consumer.batching import collapse
from consumer.embedders.base import Chunk, Embedder, Vector
from consumer.errors import ErrorClass, EventError, describe
from consumer.events import Change, Key, Op, Origin, decode, op_label
from consumer.logs import get_logger
from consumer.model_calls import ModelCalls
from consumer.retry import Publisher, RetryPolicy, RetryState, Route
from consumer.settings import Settings
from consumer.sink import Kind, Sink, State, Write, WriteBatch, text_hash

log = get_logger("cdc_embedder.pipeline")


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
    """What one batch did. Its metrics are counted by `record_metrics` once the batch is committed in
    Kafka too, so a batch applied again after a failed commit is counted once."""

    pipeline: str = ""  # the metric label of what this batch (or the part of it) added
    outcomes: Tally[str] = field(default_factory=Tally)
    events: Tally[tuple[str, str, str]] = field(default_factory=Tally)  # (pipeline, op, outcome)
    embedded_texts: int = 0
    model_s: float = 0.0
    db_s: float = 0.0
    written_rows: int = 0
    failures: list[tuple[str, Failure, Route]] = field(default_factory=list)  # (pipeline, ...)
    # (pipeline, end to end, capture) in seconds
    freshness: list[tuple[str, float, float | None]] = field(default_factory=list)

    def add(self, op: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.events[(self.pipeline, op, outcome)] += 1

    def merge(self, other: BatchReport) -> None:
        self.outcomes.update(other.outcomes)
        self.events.update(other.events)
        self.embedded_texts += other.embedded_texts
        self.model_s += other.model_s
        self.db_s += other.db_s
        self.written_rows += other.written_rows
        self.failures += other.failures
        self.freshness += other.freshness

    def record_metrics(self) -> None:
        for (pipeline, op, outcome), n in self.events.items():
            metrics.count_event(pipeline, op, outcome, n)
        for pipeline, failure, route in self.failures:
            (metrics.DEAD_LETTERS if route.dead_letter else metrics.RETRIES).labels(
                pipeline=pipeline, error_class=failure.error_class.value
            ).inc()
        for pipeline, end_to_end, capture in self.freshness:
            metrics.END_TO_END_SECONDS.labels(pipeline=pipeline).observe(end_to_end)
            if capture is not None:
                metrics.CAPTURE_SECONDS.labels(pipeline=pipeline).observe(capture)


# outcomes whose write is a freshness sample
WRITTEN = frozenset({"embedded", "unchanged", "deleted", "no_text", "table_cleared"})


@dataclass(slots=True)
class _Decoded:
    change: Change
    record: Record
    state: RetryState


@dataclass(slots=True)
class _Plan:
    """One winning change's write and the outcome it has if the guard lets it land."""

    item: _Decoded
    write: Write
    outcome: str
    text: str | None = None
    # once the write landed, the record goes to the dead-letter topic instead of having `outcome`
    dead_letter: Failure | None = None


_ToEmbed = tuple[_Decoded, str, bytes]  # a change whose text needs a vector: the text and its hash
WRITE_PART_MIN_TEXTS = 16  # smaller parts would cost the model more than their overlap saves
# English runs about 4 characters a token in BERT's vocabulary (3.9 on the corpus): with chunking, a
# text is weighed as the windows it fills. A wrong guess only moves where the parts are cut.
CHARS_PER_TOKEN = 4


def write_parts(to_embed: list[_ToEmbed], most: int, window: int | None = None) -> list[list[_ToEmbed]]:
    """`to_embed` cut into at most `most` parts of about equal model work, WRITE_PART_MIN_TEXTS texts'
    a part on average, by text length, so each part's texts are alike and the model's length-sorted
    groups stay as full as in one call. A text is one model input; with chunking (`window`: the model's
    tokens a chunk), as many as the chunks it will be cut into, so a few long documents are written in
    parts."""
    ordered = sorted(to_embed, key=lambda t: len(t[1]))
    weights = [1 if window is None else -(-len(t[1]) // (window * CHARS_PER_TOKEN)) or 1 for t in ordered]
    total = sum(weights)
    count = min(most, total // WRITE_PART_MIN_TEXTS)
    if count <= 1:  # the model sorts one call's texts itself
        return [to_embed] if to_embed else []
    parts: list[list[_ToEmbed]] = [[]]
    filled = 0
    for item, weight in zip(ordered, weights, strict=True):
        if filled >= total * len(parts) / count:
            parts.append([])
        parts[-1].append(item)
        filled += weight
    return parts


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        sink: Sink,
        publisher: Publisher,
        executor: Executor | None = None,
        key_columns: tuple[str, ...] = ("id",),
        on_model_stall: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self.name = settings.pipeline
        self._embedder = embedder
        self._sink = sink
        self._publisher = publisher
        self._policy = RetryPolicy(settings)
        self._key_columns = key_columns
        self._model = ModelCalls(
            embedder, executor, settings.model_timeout_s, settings.db_retry_backoff_max_s, on_model_stall
        )

    async def process(
        self, records: Sequence[Record], models_done: Callable[[], None] = lambda: None
    ) -> BatchReport:
        """Apply the batch. Raises only when the database or broker is unreachable (nothing committed)."""
        report, failures = await self.apply(records, models_done)
        await self.route(failures, report)
        return report

    async def apply(
        self, records: Sequence[Record], models_done: Callable[[], None] = lambda: None
    ) -> tuple[BatchReport, list[Failure]]:
        """Embed and write the batch; the failures are routed by `route`, the batch's first Kafka send.

        Apart, so that several pipelines' parts of one batch (consumer.router) are all written before
        the transaction's timeout starts: a send starts it on the broker, and a later part may wait for
        its embedding server. `models_done` is called once the batch needs the model no more (bar a
        touch decided again), for the next batch's texts to be embedded ahead (`embed_ahead`).
        """
        report = BatchReport(self.name)
        failures: list[Failure] = []
        winners, truncate = self._winners(self._decode(records, failures), report)
        plans, to_embed = await self._plan(winners, report, failures)
        truncate_at = truncate.change.position if truncate else None
        landed = await self._embed_and_write(plans, to_embed, truncate_at, report, failures, models_done)
        committed_at = time.time()
        for plan in plans:
            if plan.dead_letter is not None and plan.write.key in landed:
                failures.append(plan.dead_letter)
                continue
            outcome = plan.outcome if plan.write.key in landed else "superseded"
            report.add(plan.item.change.op.label, outcome)
            if outcome in WRITTEN:
                self._freshness(plan.item, committed_at, report)
        if truncate is not None:
            report.add(truncate.change.op.label, "table_cleared")
            self._freshness(truncate, committed_at, report)
        return report, failures

    async def embed_ahead(self, records: Sequence[Record]) -> None:
        """Embed the texts that applying `records` would embed, from what the table holds now, while the
        batch before them is written and committed; `apply` takes those vectors instead of calling the
        model. A guess: the batch before may change what these need, which `apply` decides anew."""
        scratch = BatchReport(self.name)
        try:
            winners, _ = self._winners(self._decode(records, []), scratch)
            _, to_embed = await self._plan(winners, scratch, [])
        except Exception as exc:  # the database: the batch meets the failure itself, and handles it
            log.debug("planning ahead failed; the batch embeds its texts itself", cause=describe(exc))
            return
        await self._model.embed_ahead([t for _, t, _ in to_embed], [d for _, _, d in to_embed], self.name)

    def _winners(
        self, decoded: list[_Decoded], report: BatchReport
    ) -> tuple[list[_Decoded], _Decoded | None]:
        """The changes that decide their keys' rows (the newest of each key, none a truncate removes),
        and the batch's last truncate; the others are reported superseded or ignored."""
        truncates = [d for d in decoded if d.change.op is Op.TRUNCATE]
        truncate = max(truncates, key=lambda d: d.change.position, default=None)
        live = []
        for d in decoded:
            op = d.change.op
            if op is Op.TOMBSTONE:
                report.add(op.label, "ignored")
            elif op is Op.TRUNCATE:
                if d is not truncate:
                    report.add(op.label, "superseded")
            elif truncate is not None and d.change.position < truncate.change.position:
                report.add(op.label, "superseded")  # the truncate later in the batch removes it
            else:
                live.append(d)
        winners, losers = collapse(d.change for d in live)
        by_change = {id(d.change): d for d in live}
        for change in losers:
            report.add(change.op.label, "superseded")
        return [by_change[id(c)] for c in winners.values()], truncate

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport:
        """Route one record straight to its next topic (the dead-letter topic for permanent errors)."""
        report = BatchReport(self.name)
        state = RetryState.from_headers(
            record.headers or (), Origin(record.topic, record.partition, record.offset)
        )
        await self.route([self._failure(record, state, error_class, message)], report)
        return report

    def _decode(self, records: Sequence[Record], failures: list[Failure]) -> list[_Decoded]:
        text_columns, template = self._settings.text_column_list, self._settings.text_template
        decoded = []
        for record in records:
            state = RetryState.from_headers(
                record.headers or (), Origin(record.topic, record.partition, record.offset)
            )
            try:
                change = decode(
                    record.key, record.value, state.origin, self._key_columns, text_columns, template
                )
            except EventError as exc:
                failures.append(self._failure(record, state, exc.error_class, str(exc)))
                continue
            decoded.append(_Decoded(change, record, state))
        return decoded

    async def _plan(
        self, items: list[_Decoded], report: BatchReport, failures: list[Failure]
    ) -> tuple[list[_Plan], list[_ToEmbed]]:
        """Decide each winner's write from what the table holds: nothing, a touch, or a vector to embed
        (returned apart)."""
        model = self._embedder.name
        started = time.perf_counter()
        state = await self._sink.stored([i.change.key for i in items])
        lookups = [
            i.change.key for i in items if i.change.needs_text_lookup and _admitted(state, i.change, model)
        ]
        current = await self._sink.source_texts(lookups)
        report.db_s += time.perf_counter() - started

        plans: list[_Plan] = []
        to_embed: list[_ToEmbed] = []
        for item in items:
            change = item.change
            if not _admitted(state, change, model):
                report.add(change.op.label, "superseded")
                continue
            if change.is_delete:
                plans.append(_Plan(item, _write(change, Kind.DELETED), "deleted"))
                continue
            text = change.text if change.text is not None else current.get(change.key)
            if text is None:  # the row is gone; its delete event follows
                report.add(change.op.label, "superseded")
                continue
            if isinstance(text, EventError):
                failures.append(self._failure(item.record, item.state, text.error_class, str(text)))
                continue
            if not text:  # a valid state of the row: the vector of a text it no longer has must go
                plans.append(_Plan(item, _write(change, Kind.CLEARED), "no_text"))
                continue
            if len(text) > self._settings.max_text_chars:
                # The vectors of the older text must go too, and the change is kept for a replay once
                # the limit is raised.
                limit = self._settings.max_text_chars
                reason = (
                    f"text of {len(text)} characters is over CDC_MAX_TEXT_CHARS={limit}: its vectors removed"
                )
                failure = self._failure(item.record, item.state, ErrorClass.TEXT_TOO_LONG, reason)
                plans.append(_Plan(item, _write(change, Kind.CLEARED), "superseded", dead_letter=failure))
                continue
            digest = text_hash(model, text)
            stored = state.rows.get(change.key)
            if stored is not None and not stored.deleted and stored.text_sha256 == digest:
                plans.append(_Plan(item, _write(change, Kind.TOUCH, digest), "unchanged", text))
            else:
                to_embed.append((item, text, digest))
        return plans, to_embed

    async def _embed_and_write(
        self,
        plans: list[_Plan],
        to_embed: list[_ToEmbed],
        truncate_at: int | None,
        report: BatchReport,
        failures: list[Failure],
        models_done: Callable[[], None],
    ) -> frozenset[Key]:
        """Embed and write the batch (`plans` grows by the embedded ones); returns the keys that landed.

        Each part (`write_parts`; one for a small batch) is written while the model embeds the next, so
        the model does not idle through the HNSW inserts. Each part is its own transaction, like the
        touches decided again in `_touch_again`: a batch's writes need not land together, since each is
        guarded and the batch's offsets commit only after the last, so applying the batch again after a
        failure between them changes nothing that landed.
        """
        window = self._settings.max_seq_length if self._settings.chunking == "chunk" else None
        parts = write_parts(to_embed, self._settings.batch_write_parts, window) or [[]]  # [[]]: no texts
        written: set[Key] = set()
        pending: asyncio.Task[frozenset[Key]] | None = None
        first = list(plans)  # the touches, deletes and clears go with the first part, the truncate too
        stalled: Failure | None = None
        try:
            for index, part in enumerate(parts):
                if stalled is None:
                    before = len(failures)
                    embedded = await self._embed_plans(part, report, failures)
                    stalled = _stall(failures[before:], len(part))
                else:  # the model thread is still stuck: the rest of the batch fails as that part did
                    embedded = []
                    failures += [
                        self._failure(i.record, i.state, stalled.error_class, stalled.message)
                        for i, _, _ in part
                    ]
                plans += embedded
                if pending is not None:
                    written |= await pending
                rows, truncate = (first + embedded, truncate_at) if index == 0 else (embedded, None)
                pending = asyncio.create_task(self._write(rows, truncate, report))
            models_done()
            assert pending is not None
            written |= await pending
        finally:
            # the model failed (or the batch was cancelled): no write left running, and the failure of
            # one that ended meanwhile retrieved, the batch's own error being the one raised
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return await self._touch_again(plans, frozenset(written), report, failures)

    async def _embed_plans(
        self, to_embed: list[_ToEmbed], report: BatchReport, failures: list[Failure]
    ) -> list[_Plan]:
        if not to_embed:
            return []
        embedded, errors = await self._model.embed_all(
            [t for _, t, _ in to_embed], report, [d for _, _, d in to_embed]
        )
        plans = []
        for index, (item, text, digest) in enumerate(to_embed):
            result = embedded[index]
            if result is None:
                failures.append(self._failure(item.record, item.state, *errors[index]))
                continue
            write = _write(item.change, Kind.VECTOR, digest, *result)
            plans.append(_Plan(item, write, "embedded", text))
        return plans

    async def _write(self, rows: list[_Plan], truncate_at: int | None, report: BatchReport) -> frozenset[Key]:
        """Write `rows`, after the truncate if any; returns the keys whose write landed."""
        started = time.perf_counter()
        result = await self._sink.write(WriteBatch([p.write for p in rows], truncate_at))
        report.db_s += time.perf_counter() - started
        report.written_rows += len(result.landed) + result.truncated_rows
        if result.truncated_rows:
            log.info("source table truncated: its vectors removed", rows=result.truncated_rows)
        return result.landed

    async def _touch_again(
        self, plans: list[_Plan], landed: frozenset[Key], report: BatchReport, failures: list[Failure]
    ) -> frozenset[Key]:
        """Decide again the touches that did not land; returns every key that landed.

        A touch that did not land found the stored hash changed since it was read: another member wrote
        the key meanwhile. Advancing the position over that text would leave a vector of another text
        under this change's position, so the change is decided again on what is stored now, and embedded
        if it still wins.
        """
        missed = [p for p in plans if p.write.kind is Kind.TOUCH and p.write.key not in landed]
        if not missed:
            return landed
        state = await self._sink.stored([p.write.key for p in missed])
        model = self._embedder.name
        again = []
        for plan in missed:
            plans.remove(plan)
            if plan.text is not None and _admitted(state, plan.item.change, model):
                again.append((plan.item, plan.text, text_hash(model, plan.text)))
            else:
                report.add(plan.item.change.op.label, "superseded")
        redone = await self._embed_plans(again, report, failures)
        plans += redone
        return landed | await self._write(redone, None, report)

    def _freshness(self, item: _Decoded, committed_at: float, report: BatchReport) -> None:
        if item.change.source_ts_ms is None:
            return
        source_at = item.change.source_ts_ms / 1000
        # a retry record's timestamp is its republication, not its capture
        capture = (
            max(item.record.timestamp / 1000 - source_at, 0.0)
            if item.record.topic == self._settings.source_topic
            else None
        )
        report.freshness.append((report.pipeline, max(committed_at - source_at, 0.0), capture))

    def _failure(self, record: Record, state: RetryState, error_class: ErrorClass, message: str) -> Failure:
        return Failure(record, state, op_label(record.value), error_class, message)

    async def route(self, failures: list[Failure], report: BatchReport) -> None:
        """Publish the failures to the retry or dead-letter topic, in the batch's transaction."""
        routes = [(f, self._policy.route(f.state, f.error_class, f.message)) for f in failures]
        await asyncio.gather(
            *(self._publisher.publish(r.topic, f.record.key, f.record.value, r.headers) for f, r in routes)
        )
        for failure, route in routes:
            report.add(failure.op, "dead_lettered" if route.dead_letter else "retried")
        # logged by the consumer once its transaction published them
        report.failures += [(report.pipeline, f, r) for f, r in routes]


def _write(
    change: Change,
    kind: Kind,
    digest: bytes | None = None,
    vector: Vector | None = None,
    chunks: tuple[Chunk, ...] = (),
) -> Write:
    return Write(
        change.key, kind, change.position, change.is_snapshot, change.source_ts_ms, digest, vector, chunks
    )


def _stall(failed: list[Failure], texts: int) -> Failure | None:
    """A failure of a whole model call for its time (CDC_MODEL_TIMEOUT_S), if `failed` is one: its thread
    cannot be stopped, so another call would queue behind it for as long again."""
    if failed and len(failed) == texts and all(f.error_class is ErrorClass.TIMEOUT for f in failed):
        return failed[0]
    return None


def _admitted(state: State, change: Change, model: str) -> bool:
    return state.admits(change.key, change.position, change.is_snapshot, model)
