"""Snapshots and streaming agree, on the real stack: a re-snapshot while updates flow loses nothing.

Debezium is asked for a snapshot through its signal table, as `cdc-embedder backfill` will, while
other connections keep updating the same rows, some in transactions held open across the snapshot's
read (they write at a lower LSN than the snapshot rows carry and commit after them). Whatever order
the snapshot rows and the changes reach the consumer in, every row ends with the vector of its
current text.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import orjson
import psycopg
import pytest

from consumer.connectors import signal_table_name
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from tests.harness import corpus_rows, insert_rows, wait_consistent

pytestmark = pytest.mark.integration


class Writers:
    """Updates random rows until stopped; one of them holds each transaction open for a while."""

    def __init__(self, settings: Settings, ids: list[int]) -> None:
        self.settings, self.ids, self.stop = settings, ids, threading.Event()
        self.updates = 0
        self.threads = [threading.Thread(target=self._run, args=(hold,), daemon=True) for hold in (0.0, 1.5)]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, hold_s: float) -> None:
        rng = random.Random(hold_s)
        with psycopg.connect(self.settings.dsn) as conn:
            while not self.stop.is_set():
                row = rng.choice(self.ids)
                conn.execute(
                    "UPDATE public.documents SET body = body || %s WHERE id = %s",
                    (f" edit {rng.random():.6f}", row),
                )
                time.sleep(hold_s)  # open while the snapshot may read the row
                conn.commit()
                self.updates += 1
                time.sleep(0.02)


def ask_for_snapshot(settings: Settings, kind: str, low: int, high: int) -> None:
    condition = f"id >= {low} AND id < {high}"
    # an incremental snapshot takes a condition, a blocking one the whole query
    where = condition if kind == "incremental" else f"SELECT * FROM public.documents WHERE {condition}"
    data = {
        "data-collections": ["public.documents"],
        "type": kind,
        "additional-conditions": [{"data-collection": "public.documents", "filter": where}],
    }
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {signal_table_name(settings)} (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
            (str(uuid.uuid4()), orjson.dumps(data).decode()),
        )


@pytest.mark.parametrize(("kind", "base"), [("incremental", 3_000_000), ("blocking", 3_100_000)])
def test_a_snapshot_while_updates_flow_leaves_every_row_current(
    pipeline: ConsumerProcess, settings: Settings, db: psycopg.Connection[Any], kind: str, base: int
) -> None:
    rows = corpus_rows(200, skip=3000 if kind == "incremental" else 3200, id_base=base)
    ids = [r["id"] for r in rows]
    insert_rows(db, rows)
    wait_consistent(db, settings, ids, timeout_s=300)
    read = pipeline.metric_sum("cdc_embedder_events_total", op="snapshot")
    with Writers(settings, ids) as writers:
        time.sleep(1)
        ask_for_snapshot(settings, kind, base, base + 100_000)
        wait_until(
            lambda: pipeline.metric_sum("cdc_embedder_events_total", op="snapshot") >= read + len(ids),
            300,
            f"the {kind} snapshot's rows to reach the consumer",
        )
        time.sleep(2)
    assert writers.updates > 20, "the writers did not overlap the snapshot"
    wait_consistent(db, settings, ids, timeout_s=300)
