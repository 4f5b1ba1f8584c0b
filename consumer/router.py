"""Which pipelines a record belongs to: those of its source topic (several when they embed one table
with different models); a retry record goes back to the one pipeline that failed it (its header), as
all pipelines of a consumer group share one retry topic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.pipeline import BatchReport, Failure, Record
from consumer.retry import H_PIPELINE, RetryState


class Processor(Protocol):
    """What the consumer loop applies batches with: one pipeline, or the router over several."""

    async def process(self, records: Sequence[Record], models_done: Callable[[], None] = ...) -> BatchReport:
        """Apply the batch; `models_done` is called once it needs the model no more."""

    async def embed_ahead(self, records: Sequence[Record]) -> None:
        """Embed what the batch of `records` will need, while the one before it commits."""

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport: ...


class Stage(Processor, Protocol):
    """One pipeline's processor, whose writes and Kafka sends the router can run apart."""

    async def apply(
        self, records: Sequence[Record], models_done: Callable[[], None] = ...
    ) -> tuple[BatchReport, list[Failure]]: ...

    async def route(self, failures: list[Failure], report: BatchReport) -> None: ...


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Route:
    topic: str  # the pipeline's source topic
    name: str
    processor: Stage


class Router:
    """Splits a batch by pipeline and applies each part with that pipeline's processor.

    The parts run one after the other: their tables differ, so their order does not matter, and the
    model executor runs one batch at a time anyway. A failure of one part (a database outage) raises
    before anything is committed in Kafka, and applying the parts that landed again changes nothing.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("a router needs at least one pipeline")
        self._routes = list(routes)
        # records of no pipeline are dead-lettered through one of them: routing needs no table
        self._fallback = self._routes[0].processor

    @property
    def source_topics(self) -> list[str]:
        return list(dict.fromkeys(r.topic for r in self._routes))

    def routes_of(self, record: Record) -> list[Route]:
        headers = record.headers or ()
        origin = RetryState.from_headers(
            headers, Origin(record.topic, record.partition, record.offset)
        ).origin
        routes = [r for r in self._routes if r.topic == origin.topic]
        failed_in = dict(headers).get(H_PIPELINE)
        named = [r for r in routes if failed_in is not None and r.name == failed_in.decode(errors="replace")]
        return named or routes  # a replayed dead letter, or one of a pipeline since renamed: all of them

    async def process(
        self, records: Sequence[Record], models_done: Callable[[], None] = _nothing
    ) -> BatchReport:
        parts, strays = self._split(records)
        # every part is written before any is routed: the first send starts the transaction's timeout
        applied: list[tuple[Route, BatchReport, list[Failure]]] = []
        last = list(parts)[-1] if parts else None
        for route, part in parts.items():
            done = models_done if route is last else _nothing  # the next part still calls the model
            with structlog.contextvars.bound_contextvars(pipeline=route.name):
                applied.append((route, *await route.processor.apply(part, done)))
        if not parts:
            models_done()
        report = BatchReport()
        for route, part_report, failures in applied:
            with structlog.contextvars.bound_contextvars(pipeline=route.name):
                await route.processor.route(failures, part_report)
            report.merge(part_report)
        for record in strays:
            stray = await self._fallback.dead_letter(record, ErrorClass.NO_PIPELINE, self._stray(record))
            report.merge(stray)
        return report

    async def embed_ahead(self, records: Sequence[Record]) -> None:
        for route, part in self._split(records)[0].items():
            await route.processor.embed_ahead(part)

    def _split(self, records: Sequence[Record]) -> tuple[dict[Route, list[Record]], list[Record]]:
        """The batch's part of each pipeline, in the order of the pipelines; and the records of none."""
        parts: dict[Route, list[Record]] = {route: [] for route in self._routes}
        strays: list[Record] = []
        for record in records:
            routes = self.routes_of(record)
            for route in routes:
                parts[route].append(record)
            if not routes:
                strays.append(record)
        return {route: part for route, part in parts.items() if part}, strays

    async def dead_letter(self, record: Record, error_class: ErrorClass, message: str) -> BatchReport:
        report = BatchReport()
        for route in self.routes_of(record) or [Route("", "", self._fallback)]:
            report.merge(await route.processor.dead_letter(record, error_class, message))
        return report

    def _stray(self, record: Record) -> str:
        topic = RetryState.from_headers(record.headers or (), Origin(record.topic, -1, -1)).origin.topic
        return (
            f"no pipeline reads {topic} (pipelines read {', '.join(self.source_topics)}): "
            "declare it again in CDC_PIPELINES_FILE and replay this dead letter (cdc-embedder replay-dlq)"
        )
