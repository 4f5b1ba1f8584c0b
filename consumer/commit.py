"""Committing one batch: its vectors, then one Kafka transaction with its copies and offsets.

A batch that fails is held, never skipped: `consumer.errors.diagnose` says what the failure means.
Outages and operator errors are waited out with everything paused and capped backoff; a broken
transactional producer is rebuilt before the next attempt; when the database rejects the batch for a
record's values, its records are applied one by one in the batch's transaction and the rejected ones
dead-lettered (one flat retry loop: isolating cannot recurse). Before each step of the transaction the
batch's claim on its partitions is checked (`consumer.ownership`); a batch whose partitions moved is
dropped uncommitted, and the partitions still ours are rewound to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumer.errors import Diagnosis, Disposition, ErrorClass, RowsRejected, diagnose, rebuilt_in_vain
from consumer.logs import get_logger
from consumer.ownership import Claim, Ownership
from consumer.pipeline import BatchReport, Record
from consumer.producer import Fenced, Sent, TransactionalProducer
from consumer.router import Processor
from consumer.settings import Settings
from consumer.standstill import Standstill, backoff

log = get_logger("cdc_embedder.consumer")
# Records the database rejected on their own, with none accepted in between, before the table and not
# the records is the suspect: past this the batch is held (an operator error) instead of dead-lettered.
MAX_REJECTED_IN_A_ROW = 10

Batch = list[ConsumerRecord[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Committed:
    report: BatchReport
    sent: list[Sent]  # the retry and dead-letter records the transaction published


class BatchCommitter:
    def __init__(
        self,
        settings: Settings,
        kafka: AIOKafkaConsumer,
        producer: TransactionalProducer,
        processor: Processor,
        ownership: Ownership,
        standstill: Standstill,
    ) -> None:
        self._s = settings
        self._kafka = kafka
        self._producer = producer
        self._processor = processor
        self._ownership = ownership
        self._standstill = standstill
        self._rejected_in_a_row = 0

    async def commit(
        self, records: Batch, claim: Claim, models_done: Callable[[], None] = lambda: None
    ) -> Committed | None:
        """Apply and commit the batch, holding it until that works; None if it was dropped (fenced).
        `models_done`: called once the batch needs the model no more."""
        isolate = False
        delay = 0.0
        rebuilt = 0  # producers rebuilt in a row for this batch
        while True:
            if self._ownership.lost(claim):
                self._drop(records, claim)
                return None
            try:
                committed = await self._attempt(records, claim, isolate, models_done)
            except Fenced:
                self._drop(records, claim)
                return None
            except Exception as exc:
                diagnosis = diagnose(exc, self._s)
                if diagnosis.disposition is Disposition.RECORD and not isolate:
                    log.warning(
                        "the database rejects the batch for a record's values; applying its records "
                        "one by one",
                        cause=diagnosis.cause,
                        events=len(records),
                    )
                    isolate = True
                    continue
                rebuilt = rebuilt + 1 if diagnosis.disposition is Disposition.PRODUCER else 0
                if rebuilt > 1:
                    diagnosis = rebuilt_in_vain(diagnosis)
                delay = backoff(delay, self._s.db_retry_backoff_max_s)
                await self._wait_out(diagnosis, exc, delay)
                continue
            self._standstill.recovered()
            return committed

    async def _attempt(
        self, records: Batch, claim: Claim, isolate: bool, models_done: Callable[[], None]
    ) -> Committed:
        if self._producer.broken:
            await self._producer.renew()
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        async with self._producer.transaction(lambda: not self._ownership.lost(claim)) as txn:
            if isolate:
                report, rejected_in_a_row = await self._isolated(records)
            else:
                report, rejected_in_a_row = await self._processor.process(records, models_done), 0
            await self._producer.send_offsets_to_transaction(offsets, self._s.consumer_group)
        self._rejected_in_a_row = rejected_in_a_row
        report.record_metrics()  # now that it is committed: an attempt that failed counts nothing
        return Committed(report, txn.sent)

    async def _isolated(self, records: Batch) -> tuple[BatchReport, int]:
        """Each record on its own; dead-letter those the database rejects (returns the run of rejections).

        Records the database rejects while it accepts others are wrong themselves. When it has rejected
        every record for long, the table is: raise `RowsRejected` (an operator error) instead.
        """
        total = BatchReport()
        rejected: list[tuple[Record, Diagnosis, Exception]] = []
        for record in records:
            try:
                single = await self._processor.process([record])
            except Exception as exc:
                diagnosis = diagnose(exc, self._s)
                if diagnosis.disposition is not Disposition.RECORD:
                    raise
                rejected.append((record, diagnosis, exc))
                continue
            total.merge(single)
        in_a_row = self._rejected_in_a_row + len(rejected) if len(rejected) == len(records) else 0
        if in_a_row > MAX_REJECTED_IN_A_ROW:
            raise RowsRejected(rejected[0][2])
        for record, diagnosis, _ in rejected:
            dead = await self._processor.dead_letter(record, ErrorClass.DATABASE_REJECTED, diagnosis.cause)
            total.merge(dead)
        return total, in_a_row

    def _drop(self, records: Batch, claim: Claim) -> None:
        """Abandon a batch whose partitions moved; rewind those assigned now, so nothing is skipped."""
        first = first_offsets(records)
        rewound = self._ownership.held(claim)
        for tp in rewound:
            self._kafka.seek(tp, first[tp])
        for tp in self._ownership.expelled(claim):  # until the member rejoins, every batch would drop
            self._standstill.hold(tp, None)
        log.warning(
            "partitions moved during the batch; dropped it uncommitted, their new owner applies it",
            lost=names(self._ownership.lost(claim)),
            rewound=names(rewound),
            events=len(records),
        )

    async def _wait_out(self, diagnosis: Diagnosis, exc: BaseException, delay: float) -> None:
        if diagnosis.disposition is Disposition.PRODUCER:
            log.warning("rebuilding the transactional producer; retrying the batch", cause=diagnosis.cause)
        else:
            self._standstill.report(diagnosis, exc)
        self._standstill.pause_all()
        # Polling with everything paused returns nothing but keeps this member alive in the group.
        try:
            await self._kafka.getmany(timeout_ms=int(delay * 1000))
        except KafkaError:  # the batch's next attempt says what is wrong
            await asyncio.sleep(delay)


def first_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """Each partition's first offset among the records: where to rewind it to fetch them all again."""
    first: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    return first


def names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
