"""Which pipeline a record belongs to: the one of its source topic; for a retry record, of the topic it
first came from (its origin header), since all pipelines of a consumer group share one retry topic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.pipeline import BatchReport, Record
from consumer.retry import RetryState


class Processor(Protocol):
    """What the consumer loop applies batches with: one pipeline, or the router over several."""

    async def process(self, records: Sequence[Record]) -> BatchReport: ...

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport: ...


class Router:
    """Splits a batch by pipeline and applies each part with that pipeline's processor.

    The parts run one after the other: their tables differ, so their order does not matter, and the
    model executor runs one batch at a time anyway. A failure of one part (a database outage) raises
    before anything is committed in Kafka, and applying the parts that landed again changes nothing.
    """

    def __init__(self, processors: Mapping[str, Processor], names: Mapping[str, str]) -> None:
        """`processors` and `names` (the pipelines' names) by source topic; at least one."""
        if not processors:
            raise ValueError("a router needs at least one pipeline")
        self._processors = dict(processors)
        self._names = dict(names)
        # records of no pipeline are dead-lettered through one of them: routing needs no table
        self._fallback = next(iter(self._processors.values()))

    @property
    def source_topics(self) -> list[str]:
        return list(self._processors)

    def topic_of(self, record: Record) -> str:
        fallback = Origin(record.topic, record.partition, record.offset)
        return RetryState.from_headers(record.headers or (), fallback).origin.topic

    async def process(self, records: Sequence[Record]) -> BatchReport:
        parts: dict[str, list[Record]] = {}
        strays: list[Record] = []
        for record in records:
            topic = self.topic_of(record)
            if topic in self._processors:
                parts.setdefault(topic, []).append(record)
            else:
                strays.append(record)
        report = BatchReport()
        for topic, part in parts.items():
            with structlog.contextvars.bound_contextvars(pipeline=self._names[topic]):
                report.merge(await self._processors[topic].process(part))
        for record in strays:
            report.merge(
                await self._fallback.dead_letter(record, ErrorClass.NO_PIPELINE, self._stray(record))
            )
        return report

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport:
        processor = self._processors.get(self.topic_of(record), self._fallback)
        return await processor.dead_letter(record, error_class, message)

    def _stray(self, record: Record) -> str:
        return (
            f"no pipeline reads {self.topic_of(record)} (pipelines read {', '.join(self._processors)}): "
            "declare it again in CDC_PIPELINES_FILE and replay this dead letter (cdc-embedder replay-dlq)"
        )
