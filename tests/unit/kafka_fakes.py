"""Small fakes of aiokafka's consumer and transactional producer over one in-memory broker, and of the
BatchProcessor, for unit tests of the consumer loop (consumer.app.EmbeddingConsumer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace, TracebackType
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import (
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumer.errors import ErrorClass, is_producer_fatal
from consumer.events import Origin
from consumer.pipeline import BatchReport, Record
from consumer.retry import Headers, Publisher, RetryPolicy, RetryState
from consumer.settings import Settings
from tests.unit.fakes import FakeRecord, Published


@dataclass
class FakeBroker:
    """Topics the consumer reads, what committed transactions published, and the group's offsets."""

    logs: dict[TopicPartition, list[FakeRecord]] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    max_message_bytes: dict[str, int] = field(default_factory=dict)  # topics' max.message.bytes

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> FakeRecord:
        tp = TopicPartition(topic, partition)
        log = self.logs.setdefault(tp, [])
        record = FakeRecord(topic, partition, len(log), key, value)
        log.append(record)
        return record

    def to(self, topic: str) -> list[Published]:
        return [p for p in self.published if p.topic == topic]


class FakeConsumer:
    """AIOKafkaConsumer as the loop uses it; `rebalance` does what aiokafka's coordinator does."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self._coordinator = SimpleNamespace(generation=0)  # aiokafka's, read by consumer.ownership
        self.listener: Any = None
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.fetch_errors: list[Exception] = []  # raised by the next getmany calls, one each
        self.seeks: list[tuple[TopicPartition, int]] = []

    def subscribe(self, topics: Sequence[str], listener: Any) -> None:
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            if tp not in self._assigned:
                raise IllegalStateError(f"No current assignment for partition {tp}")
            self._paused.add(tp)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return self._paused & self._assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset
        self.seeks.append((tp, offset))

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        if self.fetch_errors:
            raise self.fetch_errors.pop(0)
        budget = max_records or 1_000_000
        fetched: dict[TopicPartition, list[FakeRecord]] = {}
        for tp in sorted(self._assigned - self._paused):
            records = [r for r in self.broker.logs.get(tp, []) if r.offset >= self.positions[tp]][:budget]
            if records:
                fetched[tp] = records
                self.positions[tp] = records[-1].offset + 1
                budget -= len(records)
        if not fetched:  # as a real poll waits for records, without making the test wait for long
            await asyncio.sleep(min(timeout_ms, 2) / 1000)
        return fetched

    async def rebalance(self, partitions: set[TopicPartition]) -> None:
        """Revoke (waiting for the listener), join the next generation, assign from committed offsets."""
        await self.listener.on_partitions_revoked(set(self._assigned))
        self._coordinator.generation += 1
        self._assigned, self._paused = set(partitions), set()
        self.positions = {tp: self.broker.committed.get(tp, 0) for tp in self._assigned}
        await self.listener.on_partitions_assigned(set(self._assigned))

    def expel(self) -> None:
        """A heartbeat found the member gone: aiokafka resets its generation before any listener runs."""
        self._coordinator.generation = -1

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.broker.logs.get(tp, [])) for tp in partitions}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


class FakeTxnManager:
    def __init__(self) -> None:
        self.fatal = False

    def is_fatal_error(self) -> bool:
        return self.fatal


class FakeProducer:
    """A transactional AIOKafkaProducer: publishes and offsets land on the broker only at commit.

    `faults[op]` (op: start, send, offsets, commit) are raised by the next calls of that operation; a
    fatal one leaves the producer in aiokafka's fatal state, as its dying sender task does.
    """

    def __init__(self, broker: FakeBroker, max_request_size: int = 1_000_000) -> None:
        self.broker = broker
        self.max_request_size = max_request_size
        self._txn_manager = FakeTxnManager()
        self.faults: dict[str, list[Exception]] = {}
        self.started = self.stopped = False
        self.in_transaction = False
        self._pending: list[Published] = []
        self._pending_offsets: dict[TopicPartition, int] = {}
        self.commits = self.aborts = 0

    def _fault(self, op: str) -> None:
        faults = self.faults.get(op)
        if faults:
            exc = faults.pop(0)
            # aiokafka's sender task dies of these (and of anything else a transactional request raises)
            if is_producer_fatal(exc) or isinstance(exc, TransactionalIdAuthorizationFailed):
                self._txn_manager.fatal = True
            raise exc

    async def start(self) -> None:
        self._fault("start")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def transaction(self) -> _FakeTransaction:
        return _FakeTransaction(self)

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Headers | None = None
    ) -> asyncio.Future[None]:
        assert self.in_transaction, "aiokafka: can't send messages while not in transaction"
        headers = list(headers or [])
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._fault("send")
        except KafkaError as exc:
            delivery.set_exception(exc)
            return delivery
        if size > self.broker.max_message_bytes.get(topic, size):
            delivery.set_exception(MessageSizeTooLargeError())
        else:
            self._pending.append(Published(topic, key, value, headers))
            delivery.set_result(None)
        return delivery

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Headers | None = None
    ) -> None:
        await (await self.send(topic, value=value, key=key, headers=headers))

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        assert self.in_transaction
        self._fault("offsets")
        self._pending_offsets.update(offsets)

    def _begin(self) -> None:
        assert self.started and not self.stopped
        # aiokafka asserts a valid state transition; from its fatal state none is
        assert not self._txn_manager.fatal, "Invalid state transition FATAL_ERROR -> IN_TRANSACTION"
        self.in_transaction = True

    def _end(self, commit: bool) -> None:
        self.in_transaction = False
        if commit:
            self._fault("commit")
            self.broker.published += self._pending
            self.broker.committed.update(self._pending_offsets)
            self.commits += 1
        else:
            self.aborts += 1
        self._pending, self._pending_offsets = [], {}


class _FakeTransaction:
    def __init__(self, producer: FakeProducer) -> None:
        self._producer = producer

    async def __aenter__(self) -> _FakeTransaction:
        self._producer._begin()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self._producer._end(commit=True)
            except BaseException:
                self._producer._end(commit=False)
                raise
        elif not self._producer._txn_manager.fatal:  # as aiokafka: no abort from the fatal state
            self._producer._end(commit=False)


RETRY_ME = b"retry"  # values starting so the fake processor routes to the retry topic
KILL_ME = b"kill me"  # and these it dead-letters at once


class FakeProcessor:
    """BatchProcessor as the loop uses it: writes (records them), fails as told, routes copies."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self._policy = RetryPolicy(settings)
        self._publisher = publisher
        self.calls: list[list[tuple[int, int]]] = []  # (partition, offset) of each call's records
        self.applied: list[tuple[int, int]] = []
        self.ahead: list[list[tuple[int, int]]] = []  # (partition, offset) of each embed_ahead's records
        self.faults: list[Exception] = []  # raised by the next process calls, one each
        self.rejects: dict[tuple[int, int], Exception] = {}  # records the database rejects for their values
        self.during: Callable[[], Awaitable[None]] | None = None  # awaited inside each process call

    async def process(
        self, records: Sequence[Record], models_done: Callable[[], None] = lambda: None
    ) -> BatchReport:
        ids = [(r.partition, r.offset) for r in records]
        self.calls.append(ids)
        models_done()  # what follows is the write and the routing, beside the next batch's embedding
        if self.during is not None:
            await self.during()
        if self.faults:
            raise self.faults.pop(0)
        rejected = [self.rejects[i] for i in ids if i in self.rejects]
        if rejected:  # one statement for the batch: one bad row fails it all
            raise rejected[0]
        report = BatchReport()
        for record in records:
            value = record.value or b""
            if value.startswith((RETRY_ME, KILL_ME)):
                error = ErrorClass.MODEL_ERROR if value.startswith(RETRY_ME) else ErrorClass.INVALID_JSON
                await self._route(record, error, f"the fake says {value[:7]!r}", report)
            else:
                report.outcomes["embedded"] += 1
        self.applied += ids
        return report

    async def embed_ahead(self, records: Sequence[Record]) -> None:
        self.ahead.append([(r.partition, r.offset) for r in records])

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport:
        report = BatchReport()
        await self._route(record, error_class, message, report)
        return report

    async def _route(self, record: Record, error: ErrorClass, message: str, report: BatchReport) -> None:
        state = RetryState.from_headers(record.headers, Origin(record.topic, record.partition, record.offset))
        route = self._policy.route(state, error, message)
        await self._publisher.publish(route.topic, record.key, record.value, route.headers)
        report.outcomes["dead_lettered" if route.dead_letter else "retried"] += 1
