"""A stream of inserts, updates and deletes from the corpus, run in a thread while a fault happens."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer

from consumer.kafka import read_whole_topic, stop_groupless
from consumer.settings import Settings
from tests.harness import corpus_rows


@dataclass
class Workload:
    """`operations` changes on rows `id_base + 1..`, about `rate` per second; survives a Postgres outage."""

    settings: Settings
    id_base: int
    operations: int = 300
    rate: float = 40.0
    marks: dict[int, str] = field(default_factory=dict)  # row index -> text appended to its body
    done: threading.Event = field(default_factory=threading.Event)
    ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Scenarios take different corpus texts, so that no two share a text by accident.
        self._rows = corpus_rows(
            self.operations, skip=(self.id_base // 100_000 * self.operations) % 50_000, id_base=self.id_base
        )
        for index, mark in self.marks.items():
            self._rows[index]["body"] += " " + mark
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def marked(self, mark: str) -> set[int]:
        """Ids of the rows whose body carries `mark`."""
        return {int(self._rows[i]["id"]) for i, m in self.marks.items() if m == mark}

    def start(self) -> Workload:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 600) -> set[int]:
        self._thread.join(timeout_s)
        assert self.done.is_set(), "the workload did not finish"
        assert self.error is None, f"the workload failed: {self.error!r}"
        return self.ids

    def _run(self) -> None:
        rng = random.Random(self.id_base)
        try:
            conn = self._connect()
            live: list[int] = []
            for step, row in enumerate(self._rows):
                roll = rng.random()
                while True:
                    try:
                        if live and roll < 0.2:  # update the text of an earlier row
                            target = rng.choice(live)
                            conn.execute(
                                "UPDATE public.documents SET body = body || %s WHERE id = %s",
                                (f" (revised at step {step})", target),
                            )
                        elif live and roll < 0.27:  # delete an earlier row
                            target = live.pop(rng.randrange(len(live)))
                            conn.execute("DELETE FROM public.documents WHERE id = %s", (target,))
                        conn.execute(
                            "INSERT INTO public.documents (id, title, body) "
                            "VALUES (%(id)s, %(title)s, %(body)s)",
                            row,
                        )
                        conn.commit()
                        break
                    except psycopg.OperationalError:  # Postgres is down for the test: wait it out
                        time.sleep(1.0)
                        conn = self._connect()
                live.append(row["id"])
                self.ids.add(row["id"])
                time.sleep(1.0 / self.rate)
            conn.close()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def _connect(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + 120
        while True:
            try:
                return psycopg.connect(self.settings.dsn, connect_timeout=3)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """Every committed record of a topic, from the beginning."""

    async def read() -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            tps = await read_whole_topic(consumer, topic)
            if not tps:
                return []
            ends = await consumer.end_offsets(tps)
            out = []
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    out += [(r.key, r.value, dict(r.headers or ())) for r in records]
            return out
        finally:
            await stop_groupless(consumer)

    return asyncio.run(read())
