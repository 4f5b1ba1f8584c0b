"""The consumer's transactional producer: fenced transactions, rebuilt when broken, no copy too large.

Every batch's retry and dead-letter copies and its offsets go out in one transaction of this producer.
The transaction is bound to the batch's claim on its partitions: each send, the offsets and the commit
first check it, and a claim that no longer holds aborts the transaction (`Fenced`).

A producer whose transactional state is lost (fenced, out-of-order sequence, invalid transaction state:
aiokafka's sender task dies with it) is stopped and replaced by a new one with the same transactional
id, through the same factory, before the next transaction. That keeps the member in its group and the
model loaded, and it recovers from an authorization error without a restart, where exiting would crash
loop until someone fixed the ACL.

A copy the producer or the broker refuses as too large becomes a reference dead letter: no value, the
copy's cdc-* headers (they name the original topic, partition and offset, to re-read it) and
`cdc-payload-dropped`. A broker's refusal spends the record's sequence number, so it also condemns the
producer; the refused size is remembered per topic, and the batch's next attempt, on a new producer,
sends the reference without trying the copy again.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumer import metrics
from consumer.errors import is_producer_fatal
from consumer.kafka import make_producer
from consumer.logs import get_logger
from consumer.retry import H_PAYLOAD_DROPPED, Headers
from consumer.settings import Settings

log = get_logger("cdc_embedder.producer")


class Fenced(Exception):
    """The batch's partitions moved to another member or assignment: its transaction must not commit."""


@dataclass(frozen=True, slots=True)
class Sent:
    topic: str
    key: bytes | None
    headers: Headers
    payload_dropped: bool


class Transaction:
    """One batch's transaction: what it sent, and the claim it must still hold to go on."""

    def __init__(self, still_owned: Callable[[], bool]) -> None:
        self._still_owned = still_owned
        self.sent: list[Sent] = []

    def check(self) -> None:
        if not self._still_owned():
            raise Fenced("the batch's partitions moved to another member or assignment")


class TransactionalProducer:
    def __init__(self, settings: Settings, factory: Callable[[], AIOKafkaProducer] | None = None) -> None:
        self._settings = settings
        self._factory = factory or (lambda: make_producer(settings, transactional=True))
        self._producer = self._factory()
        self._started = False
        self._condemned = False
        self._txn: Transaction | None = None
        self._refused_bytes: dict[str, int] = {}  # per topic, the smallest copy its broker refused

    @property
    def broken(self) -> bool:
        """True when the next transaction needs a new producer (`renew`)."""
        return self._condemned or not self._started or _fatal(self._producer)

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        await self._producer.stop()

    async def renew(self) -> None:
        """Stop this producer and start a new one with the same transactional id (a new epoch)."""
        metrics.PRODUCER_RENEWALS.inc()
        try:
            await self._producer.stop()
        finally:
            self._producer, self._started, self._condemned = self._factory(), False, False
        await self.start()
        log.info("transactional producer rebuilt")

    @contextlib.asynccontextmanager
    async def transaction(self, still_owned: Callable[[], bool]) -> AsyncIterator[Transaction]:
        txn = Transaction(still_owned)
        txn.check()
        self._txn = txn
        try:
            async with self._producer.transaction():
                yield txn
                txn.check()  # a commit now would commit offsets of partitions another member owns
        except BaseException as exc:
            if is_producer_fatal(exc):
                self._condemned = True
            raise
        finally:
            self._txn = None

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        self._current().check()
        await self._producer.send_offsets_to_transaction(offsets, group_id)

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Headers | None = None
    ) -> Any:
        txn = self._current()
        txn.check()
        headers = list(headers or ())
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if value is not None and size >= self._refused_bytes.get(topic, sys.maxsize):
            return await self._send_reference(txn, topic, key, headers, size)
        try:
            delivery = await self._producer.send(topic, value=value, key=key, headers=headers)
        except MessageSizeTooLargeError:  # the producer's own limit: nothing sent, the transaction goes on
            return await self._send_reference(txn, topic, key, headers, size)
        try:
            result = await delivery
        except Exception as exc:
            # The broker refused the record, and its sequence number is spent: the producer's next record
            # to that partition would be out of order. Only a new producer (a new epoch) can go on.
            self._condemned = True
            if isinstance(exc, MessageSizeTooLargeError):
                self._refused_bytes[topic] = min(size, self._refused_bytes.get(topic, size))
            raise
        txn.sent.append(Sent(topic, key, headers, payload_dropped=False))
        return result

    async def _send_reference(
        self, txn: Transaction, refused_by: str, key: bytes | None, headers: Headers, size: int
    ) -> Any:
        topic = self._settings.dlq_topic
        headers = [*headers, (H_PAYLOAD_DROPPED, f"{size} bytes refused by {refused_by}".encode())]
        # aiokafka refuses a record with neither key nor value; Debezium's records always have a key
        value = None if key is not None else b""
        result = await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
        metrics.DEAD_LETTER_REFERENCES.inc()
        txn.sent.append(Sent(topic, key, headers, payload_dropped=True))
        return result

    def _current(self) -> Transaction:
        if self._txn is None:
            raise RuntimeError("the consumer's producer publishes only inside a batch's transaction")
        return self._txn


def _fatal(producer: AIOKafkaProducer) -> bool:
    """aiokafka's own test before it aborts a transaction (TransactionContext); it has no public one."""
    manager = getattr(producer, "_txn_manager", None)
    return bool(manager is not None and manager.is_fatal_error())
