"""The consumer loop: fetch micro-batches, apply them, commit offsets; survive outages and rebalances.

Each batch runs inside a Kafka transaction: its failures are published to the retry or dead-letter
topic and its offsets committed atomically, after its vectors are in Postgres. A crash anywhere before
that commit aborts the publishes, and the batch is applied again (the sink makes that a no-op), so a
record reaches the dead-letter topic exactly once.

A failing batch is held, never skipped (`consumer.commit`): while Postgres or the broker is unreachable,
or an operator must fix a grant, a setting or a table, the loop pauses every partition (the group
heartbeat goes on in aiokafka's background task) and retries with backoff, so memory stays bounded
(`consumer.standstill`). A batch whose partitions moved to another member never commits
(`consumer.ownership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.batching import gather_batch
from consumer.commit import Batch, BatchCommitter, first_offsets, names
from consumer.errors import Diagnosis, Disposition, describe, diagnose
from consumer.events import Origin
from consumer.health import HealthState
from consumer.kafka import partition_lag
from consumer.logs import get_logger
from consumer.ownership import UNSTAMPED, Claim, Ownership, Stamp
from consumer.pipeline import BatchReport, Record
from consumer.producer import Sent, TransactionalProducer
from consumer.retry import H_ERROR_CLASS, H_ERROR_MESSAGE, H_PIPELINE, RetryState, now_ms
from consumer.router import Processor
from consumer.settings import Settings
from consumer.sink import Sink
from consumer.standstill import Standstill, backoff

log = get_logger("cdc_embedder.consumer")
OBSERVE_INTERVAL_S = 2.0
IDLE_POLL_S = 0.5  # how often an idle loop checks for shutdown


class EmbeddingConsumer:
    def __init__(
        self,
        settings: Settings,
        kafka: AIOKafkaConsumer,
        producer: TransactionalProducer,
        processor: Processor,
        sink: Sink,
        health: HealthState,
        source_topics: Sequence[str] = (),
    ) -> None:
        """`source_topics`: of every pipeline; by default the one of `settings`."""
        self._s = settings
        self._topics = [*(source_topics or [settings.source_topic]), settings.retry_topic]
        self._kafka = kafka
        self._processor = processor
        self._sink = sink
        self._health = health
        self._lock = asyncio.Lock()  # held while a batch is applied; revocation waits for it
        self._ownership = Ownership(kafka)
        self._standstill = Standstill(kafka, health)
        self._committer = BatchCommitter(
            settings, kafka, producer, processor, self._ownership, self._standstill
        )
        self._claim: dict[TopicPartition, Stamp] = {}  # of the batch being gathered
        self._fetch_failure: Diagnosis | None = None
        self._fetch_delay = 0.0
        self._last_record_ms: dict[TopicPartition, int] = {}
        self._stopping = False

    # --- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Gather a batch, apply it; with CDC_EMBED_AHEAD, gather the next one as soon as the model is
        done with the batch in flight and embed its texts while that one writes and commits."""
        self._kafka.subscribe(self._topics, listener=_Listener(self))
        observer = asyncio.create_task(self._observe(), name="observe")
        inflight: _InFlight | None = None
        try:
            while not stop.is_set():
                if inflight is not None:
                    await inflight.model_free()
                    if inflight.task.done():  # what it rewound is fetched from here on
                        await inflight.task
                        inflight = None
                records = await gather_batch(
                    self._fetch,
                    self._s.batch_max_events,
                    self._s.batch_max_wait_ms / 1000,
                    IDLE_POLL_S,
                    stop.is_set,
                    max_bytes=self._s.batch_max_bytes,
                    size=_size,
                    give_back=self._give_back,
                )
                claim, self._claim = self._claim, {}
                if inflight is not None:
                    records = await self._behind(inflight, records, stop.is_set)
                    inflight = None
                if records and not stop.is_set():
                    inflight = self._start(records, claim)
                    if not self._s.embed_ahead:
                        await inflight.task
                        inflight = None
            if inflight is not None:  # stopping: finish the batch in flight
                await inflight.task
        finally:
            self._stopping = True
            if inflight is not None and not inflight.task.done():  # cancelled: the batch is abandoned
                inflight.task.cancel()
                await asyncio.gather(inflight.task, return_exceptions=True)
            observer.cancel()
            self._standstill.close()

    def _start(self, records: Batch, claim: Claim) -> _InFlight:
        models_done = asyncio.Event()

        async def apply() -> bool:
            async with self._lock:
                return await self._apply(self._due(records), claim, models_done.set)

        return _InFlight(records, asyncio.create_task(apply(), name="batch"), models_done)

    async def _behind(self, inflight: _InFlight, records: Batch, stopping: Callable[[], bool]) -> Batch:
        """Embed `records`' texts while the batch in flight commits; returns them to apply next, or none
        if that batch was dropped: fetched before its rewind, they go back and come again."""
        ahead = [r for r in records if r.topic != self._s.retry_topic]  # retries wait for their time
        early = None
        if ahead:
            early = asyncio.create_task(self._processor.embed_ahead(ahead), name="ahead")
        try:
            committed = await inflight.task
            if early is not None and not stopping():
                await early  # the batch would only queue behind it for the model thread
        finally:
            if early is not None and not early.done():  # stopping, or the batch in flight failed
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
        if committed:
            return records
        # Each partition back to the first record of either batch: a later offset would skip what the
        # dropped batch held, an earlier one only applies records again (a no-op for the sink).
        assigned = self._kafka.assignment()
        both = first_offsets([*inflight.records, *records])
        for tp in first_offsets(records):
            if tp in assigned:
                self._kafka.seek(tp, both[tp])
        return []

    async def _fetch(self, max_records: int, timeout_s: float) -> Batch:
        try:
            batches = await self._kafka.getmany(
                timeout_ms=max(int(timeout_s * 1000), 1), max_records=max_records
            )
        except KafkaError as exc:  # e.g. not authorized to read a topic; no batch is held, so no pause
            self._fetch_failure = diagnose(exc, self._s)
            self._standstill.report(self._fetch_failure, exc)
            self._fetch_delay = backoff(self._fetch_delay, self._s.db_retry_backoff_max_s)
            await asyncio.sleep(self._fetch_delay)
            return []
        if self._fetch_failure is not None:
            if self._standstill.trouble is self._fetch_failure:
                self._standstill.recovered()
            self._fetch_failure, self._fetch_delay = None, 0.0
        for tp in batches:
            stamp = self._ownership.stamp(tp)
            if stamp is not None:
                self._claim.setdefault(tp, stamp)  # a partition assigned anew since is a lost claim
        return [record for records in batches.values() for record in records]

    def _give_back(self, records: Batch) -> None:
        """Records fetched past the batch's byte budget: rewound to, so the next batches fetch them again
        (a partition revoked meanwhile is its new owner's, from the committed offset)."""
        assigned = self._kafka.assignment()
        for tp, offset in first_offsets(records).items():
            if tp in assigned:
                self._kafka.seek(tp, offset)

    def _due(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> Batch:
        """Drop records of revoked partitions; hold back retry records that are not due yet.

        A retry partition whose head record is not due is rewound to it and paused until then, which
        neither blocks the source partitions nor polls in a busy loop.
        """
        assigned = self._kafka.assignment()
        due: Batch = []
        held: set[TopicPartition] = set()
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp not in assigned or tp in held:
                continue
            if record.topic == self._s.retry_topic:
                wait_ms = (
                    RetryState.from_headers(record.headers or (), _origin(record)).not_before_ms - now_ms()
                )
                if wait_ms > 0:
                    held.add(tp)
                    self._kafka.seek(tp, record.offset)
                    self._standstill.hold(tp, wait_ms / 1000)
                    continue
            due.append(record)
        return due

    async def _apply(self, records: Batch, gathered: Claim, models_done: Callable[[], None]) -> bool:
        """Apply and commit the batch; False if it was dropped (its partitions moved)."""
        if not records:
            models_done()
            return True
        started = time.perf_counter()
        partitions = {TopicPartition(r.topic, r.partition) for r in records}
        claim = {tp: gathered.get(tp, UNSTAMPED) for tp in partitions}
        committed = await self._committer.commit(records, claim, models_done)
        self._standstill.resume_all()
        if committed is None:
            return False
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._last_record_ms[tp] = max(self._last_record_ms.get(tp, 0), record.timestamp)
        self._record(records, committed.report, time.perf_counter() - started)
        self._log_routed(committed.sent)
        return True

    # --- bookkeeping ----------------------------------------------------------------------------
    def _record(self, records: Sequence[Record], report: BatchReport, seconds: float) -> None:
        metrics.BATCHES.inc()
        metrics.BATCH_SIZE.observe(len(records))
        metrics.MODEL_SECONDS.observe(report.model_s)
        metrics.DB_SECONDS.observe(report.db_s)
        metrics.LAST_BATCH_TIMESTAMP.set_to_current_time()
        self._health.database_ok = True
        offsets = defaultdict(list)
        for record in records:
            offsets[f"{record.topic}[{record.partition}]"].append(record.offset)
        log.info(
            "batch",
            events=len(records),
            **dict(report.outcomes),
            texts=report.embedded_texts,
            model_ms=round(report.model_s * 1000, 1),
            db_ms=round(report.db_s * 1000, 1),
            total_ms=round(seconds * 1000, 1),
            offsets={tp: [min(o), max(o)] for tp, o in offsets.items()},
        )

    def _log_routed(self, sent: Sequence[Sent]) -> None:
        """One line per record the committed batch routed: dead letters warn, retries inform."""
        for item in sent:
            headers = dict(item.headers)
            state = RetryState.from_headers(item.headers, Origin(item.topic, -1, -1))
            fields = {
                "key": _text(item.key),
                "pipeline": _text(headers.get(H_PIPELINE)),
                "error_class": _text(headers.get(H_ERROR_CLASS)),
                "reason": _text(headers.get(H_ERROR_MESSAGE)),
                "attempt": state.attempts,
                "to": item.topic,
                **state.origin.as_log(),
            }
            if item.topic == self._s.dlq_topic:
                log.warning("dead-lettered", payload_dropped=item.payload_dropped, **fields)
            else:
                log.info("retry scheduled", due_in_s=max(state.not_before_ms - now_ms(), 0) / 1000, **fields)

    async def _observe(self) -> None:
        """Lag, database health and assignment, every few seconds."""
        while not self._stopping:
            await asyncio.sleep(OBSERVE_INTERVAL_S)
            assigned = self._kafka.assignment()
            metrics.ASSIGNED_PARTITIONS.set(len(assigned))
            self._health.partitions_assigned = bool(assigned)
            # Fetching stops as soon as Postgres is found down, not only when a batch hits the outage.
            try:
                await asyncio.wait_for(self._sink.ping(), 5)
            except Exception as exc:
                down = Diagnosis(Disposition.OUTAGE, f"database unavailable ({describe(exc)})", database=True)
                self._standstill.report(down, exc)
                self._standstill.pause_all()
            else:
                self._health.database_ok = True
                # a held batch ends the outage itself, when it commits
                if self._standstill.database_down and not self._lock.locked():
                    self._standstill.recovered()
                    self._standstill.resume_all()
            try:
                lags = await asyncio.wait_for(partition_lag(self._kafka, set(assigned)), 10)
            except TimeoutError:
                continue
            for tp, lag in lags.items():
                labels = {"topic": tp.topic, "partition": str(tp.partition)}
                metrics.CONSUMER_LAG.labels(**labels).set(lag)
                last = self._last_record_ms.get(tp)
                age = (time.time() * 1000 - last) / 1000 if lag and last else 0.0
                metrics.CONSUMER_LAG_SECONDS.labels(**labels).set(max(age, 0.0))

    def forget(self, partitions: set[TopicPartition]) -> None:
        self._ownership.revoked(partitions)  # from here on, a batch still in flight cannot commit
        self._standstill.forget(partitions)
        for tp in partitions:
            self._last_record_ms.pop(tp, None)
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels.values())

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self._ownership.assigned(partitions)
        self._standstill.assigned(partitions)
        metrics.REBALANCES.inc()
        assigned = self._kafka.assignment()
        metrics.ASSIGNED_PARTITIONS.set(len(assigned))
        self._health.partitions_assigned = bool(assigned)
        log.info("partitions assigned", partitions=names(assigned))


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A batch being applied, and the event its model calls set when it needs the model no more."""

    records: Batch
    task: asyncio.Task[bool]
    models_done: asyncio.Event

    async def model_free(self) -> None:
        """Until the batch needs the model no more, or has ended (a failure may skip the signal)."""
        signal = asyncio.ensure_future(self.models_done.wait())
        try:
            await asyncio.wait({self.task, signal}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal.cancel()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EmbeddingConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let the in-flight batch finish and commit. Past the grace period the partitions are given up
        # anyway: `forget` fences the batch, which then drops uncommitted, and the new owner applies it.
        owner = self._owner
        try:
            await asyncio.wait_for(owner._lock.acquire(), owner._s.shutdown_grace_s)
            owner._lock.release()
        except TimeoutError:
            log.warning("revocation did not wait for the in-flight batch; it will not commit")
        owner.forget(set(revoked))
        log.info("partitions revoked", partitions=names(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._owner.assigned(set(assigned))


def _size(record: Record) -> int:
    return len(record.key or b"") + len(record.value or b"")


def _origin(record: Record) -> Origin:
    return Origin(record.topic, record.partition, record.offset)


def _text(raw: bytes | None, limit: int = 200) -> str | None:
    return None if raw is None else raw.decode(errors="replace")[:limit]
