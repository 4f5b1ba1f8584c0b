"""Why the consumer is standing still, and the partitions it paused for it.

While a batch is held (Postgres or the broker is down, an operator must fix something, the producer is
rebuilt) or Postgres is found down, every partition is paused: polling then returns nothing but keeps
the member in its group, and nothing is fetched that would have to be held too. Each cause is logged
once, when it starts or changes, with what fixes it; readiness reports operator errors and database
outages until the next batch commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import metrics
from consumer.errors import Diagnosis, Disposition
from consumer.health import HealthState
from consumer.logs import get_logger

log = get_logger("cdc_embedder.consumer")
FIRST_BACKOFF_S = 0.5


def backoff(delay: float, cap: float) -> float:
    """The next wait of a retry loop: doubling from FIRST_BACKOFF_S (0: the first), capped."""
    return min(delay * 2, cap) if delay else min(FIRST_BACKOFF_S, cap)


class Standstill:
    def __init__(self, kafka: AIOKafkaConsumer, health: HealthState) -> None:
        self._kafka = kafka
        self._health = health
        self.trouble: Diagnosis | None = None  # the outage or operator error being waited out
        self.all_paused = False
        # Partitions paused on their own: retry partitions until their head is due (a timer), and those
        # of a batch dropped because the member was expelled, until the rebalance revokes them (None).
        self._held: dict[TopicPartition, asyncio.TimerHandle | None] = {}

    @property
    def database_down(self) -> bool:
        trouble = self.trouble
        return trouble is not None and trouble.database and trouble.disposition is Disposition.OUTAGE

    def report(self, diagnosis: Diagnosis, exc: BaseException) -> None:
        """An outage or operator error: readiness, metrics, and one log line per cause."""
        outage = diagnosis.disposition is Disposition.OUTAGE
        if outage and diagnosis.database:
            metrics.DB_ERRORS.inc()
            self._health.database_ok = False
        self._health.operator_error = None if outage else diagnosis.explained
        if self.trouble is None or self.trouble.cause != diagnosis.cause:
            if outage:
                log.warning("dependency unavailable; holding until it is back", cause=diagnosis.cause)
            else:
                log.error(
                    "operator error; holding until it is fixed",
                    cause=diagnosis.cause,
                    fix=diagnosis.fix,
                    exc_info=exc if diagnosis.unexpected else None,
                )
        self.trouble = diagnosis

    def recovered(self) -> None:
        if self.trouble is None:
            return
        log.info("recovered", cause=self.trouble.cause)
        self.trouble = None
        self._health.operator_error = None
        self._health.database_ok = True

    def pause_all(self) -> None:
        self.all_paused = True
        self._kafka.pause(*self._kafka.assignment())
        self.update_paused()

    def resume_all(self) -> None:
        if not self.all_paused:
            return
        self.all_paused = False
        self._kafka.resume(*(tp for tp in self._kafka.assignment() if tp not in self._held))
        self.update_paused()

    def hold(self, tp: TopicPartition, delay_s: float | None) -> None:
        """Pause one partition for `delay_s`, or (None) until it is revoked."""
        self._kafka.pause(tp)
        self._cancel(tp)
        loop = asyncio.get_running_loop()
        self._held[tp] = None if delay_s is None else loop.call_later(delay_s, self._release, tp)
        self.update_paused()

    def _release(self, tp: TopicPartition) -> None:
        self._held.pop(tp, None)
        if not self.all_paused and tp in self._kafka.assignment():
            self._kafka.resume(tp)
        self.update_paused()

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        if self.all_paused:
            self._kafka.pause(*partitions)
        self.update_paused()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._cancel(tp)
        self.update_paused()

    def close(self) -> None:
        self.forget(list(self._held))

    def _cancel(self, tp: TopicPartition) -> None:
        handle = self._held.pop(tp, None)
        if handle is not None:
            handle.cancel()

    def update_paused(self) -> None:
        metrics.PAUSED_PARTITIONS.set(len(self._kafka.paused()))
