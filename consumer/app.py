"""The consumer loop: fetch micro-batches, apply them, commit offsets; survive outages and rebalances.

Each batch runs inside a Kafka transaction: its failures are published to the retry or dead-letter
topic and its offsets committed atomically, after its vectors are in Postgres. A crash anywhere before
that commit aborts the publishes, and the batch is applied again (the sink makes that a no-op), so a
record reaches the dead-letter topic exactly once.

While Postgres or the broker is unreachable the loop holds the batch, pauses every partition (the group
heartbeat goes on in aiokafka's background task) and retries with backoff, so memory stays bounded and
nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.batching import gather_batch
from consumer.errors import ErrorClass, is_database_outage
from consumer.events import Origin
from consumer.health import HealthState
from consumer.kafka import partition_lag
from consumer.logs import get_logger
from consumer.pipeline import BatchProcessor, BatchReport, Record
from consumer.retry import RetryState, now_ms
from consumer.settings import Settings
from consumer.sink import Sink

log = get_logger("cdc_embedder.consumer")
OBSERVE_INTERVAL_S = 2.0
IDLE_POLL_S = 0.5  # how often an idle loop checks for shutdown


class _Outage(Exception):
    """Postgres or the broker is unreachable: hold the batch, pause, retry."""


class EmbeddingConsumer:
    def __init__(
        self,
        settings: Settings,
        kafka: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        processor: BatchProcessor,
        sink: Sink,
        health: HealthState,
    ) -> None:
        self._s = settings
        self._kafka = kafka
        self._producer = producer
        self._processor = processor
        self._sink = sink
        self._health = health
        self._lock = asyncio.Lock()  # held while a batch is applied; revocation waits for it
        self._backoff_paused: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._in_outage = False
        self._last_record_ms: dict[TopicPartition, int] = {}
        self._stopping = False

    # --- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._kafka.subscribe([self._s.source_topic, self._s.retry_topic], listener=_Listener(self))
        observer = asyncio.create_task(self._observe(), name="observe")
        try:
            while not stop.is_set():
                records = await gather_batch(
                    self._fetch,
                    self._s.batch_max_events,
                    self._s.batch_max_wait_ms / 1000,
                    IDLE_POLL_S,
                    stop.is_set,
                )
                if records:
                    async with self._lock:
                        await self._apply(self._due(records))
        finally:
            self._stopping = True
            observer.cancel()
            for handle in self._backoff_paused.values():
                handle.cancel()

    async def _fetch(self, max_records: int, timeout_s: float) -> list[ConsumerRecord[bytes, bytes]]:
        batches = await self._kafka.getmany(timeout_ms=max(int(timeout_s * 1000), 1), max_records=max_records)
        return [record for records in batches.values() for record in records]

    def _due(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[ConsumerRecord[bytes, bytes]]:
        """Drop records of revoked partitions; hold back retry records that are not due yet.

        A retry partition whose head record is not due is rewound to it and paused until then, which
        neither blocks the source partitions nor polls in a busy loop.
        """
        assigned = self._kafka.assignment()
        due: list[ConsumerRecord[bytes, bytes]] = []
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
                    self._hold(tp, record.offset, wait_ms / 1000)
                    continue
            due.append(record)
        return due

    def _hold(self, tp: TopicPartition, offset: int, delay_s: float) -> None:
        self._kafka.seek(tp, offset)
        self._kafka.pause(tp)
        self._backoff_paused[tp] = asyncio.get_running_loop().call_later(delay_s, self._release, tp)
        self._update_paused()

    def _release(self, tp: TopicPartition) -> None:
        self._backoff_paused.pop(tp, None)
        if not self._in_outage and tp in self._kafka.assignment():
            self._kafka.resume(tp)
        self._update_paused()

    async def _apply(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        if not records:
            return
        started = time.perf_counter()
        report = await self._holding(records)
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._last_record_ms[tp] = max(self._last_record_ms.get(tp, 0), record.timestamp)
        self._record(records, report, time.perf_counter() - started)

    async def _transact(self, records: list[ConsumerRecord[bytes, bytes]], isolate: bool) -> BatchReport:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        async with self._producer.transaction():
            if isolate:
                report = await self._processor.dead_letter(
                    records[0], ErrorClass.DATABASE_REJECTED, "the record breaks its batch"
                )
            else:
                report = await self._processor.process(records)
            await self._producer.send_offsets_to_transaction(offsets, self._s.consumer_group)
        report.record_metrics()
        return report

    async def _holding(
        self, records: list[ConsumerRecord[bytes, bytes]], isolate: bool = False
    ) -> BatchReport:
        """Apply and commit the batch, holding it through outages; isolate a record that breaks it."""
        delay = 0.5
        while True:
            try:
                report = await self._transact(records, isolate)
            except Exception as exc:
                if not (is_database_outage(exc) or isinstance(exc, KafkaError)):
                    return await self._isolate(records, exc)
                await self._wait_out(exc, delay)
                delay = min(delay * 2, self._s.db_retry_backoff_max_s)
                continue
            if self._in_outage:
                self._end_outage()
            return report

    async def _isolate(self, records: list[ConsumerRecord[bytes, bytes]], exc: Exception) -> BatchReport:
        """A non-transient error on a whole batch: apply record by record, dead-letter the culprit."""
        if len(records) == 1:
            log.error(
                "record breaks its batch; dead-lettering it", error=repr(exc), **_origin(records[0]).as_log()
            )
            return await self._holding(records, isolate=True)
        total = BatchReport()
        for record in records:
            total.merge(await self._holding([record]))
        return total

    async def _wait_out(self, exc: BaseException, delay: float) -> None:
        self._start_outage(exc)
        # Polling with everything paused returns nothing but keeps this member alive in the group.
        await self._kafka.getmany(timeout_ms=int(delay * 1000))

    def _start_outage(self, exc: BaseException) -> None:
        if is_database_outage(exc):
            metrics.DB_ERRORS.inc()
            self._health.database_ok = False
        if not self._in_outage:
            log.warning("dependency unavailable; pausing partitions until it is back", error=str(exc))
            self._in_outage = True
        self._kafka.pause(*self._kafka.assignment())
        self._update_paused()

    def _end_outage(self) -> None:
        self._in_outage = False
        self._health.database_ok = True
        self._kafka.resume(*(tp for tp in self._kafka.assignment() if tp not in self._backoff_paused))
        self._update_paused()
        log.info("dependencies back; partitions resumed")

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

    def _update_paused(self) -> None:
        paused = self._kafka.paused()
        metrics.PAUSED_PARTITIONS.set(len(paused))

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
                self._start_outage(exc if is_database_outage(exc) else TimeoutError(str(exc)))
            else:
                self._health.database_ok = True
                if self._in_outage and not self._lock.locked():
                    self._end_outage()
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
        for tp in partitions:
            handle = self._backoff_paused.pop(tp, None)
            if handle is not None:
                handle.cancel()
            self._last_record_ms.pop(tp, None)
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels.values())
        self._update_paused()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        metrics.REBALANCES.inc()
        if self._in_outage:
            self._kafka.pause(*partitions)
        assigned = self._kafka.assignment()
        metrics.ASSIGNED_PARTITIONS.set(len(assigned))
        self._health.partitions_assigned = bool(assigned)
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EmbeddingConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let the in-flight batch finish and commit; past the grace period its records are simply
        # re-applied by the new owner, which the idempotent sink makes harmless.
        owner = self._owner
        try:
            await asyncio.wait_for(owner._lock.acquire(), owner._s.shutdown_grace_s)
            owner._lock.release()
        except TimeoutError:
            log.warning("revocation did not wait for the in-flight batch")
        owner.forget(set(revoked))
        log.info("partitions revoked", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._owner.assigned(set(assigned))


def _origin(record: Record) -> Origin:
    return Origin(record.topic, record.partition, record.offset)
