"""The real pipeline under the bench: its own stack folder and ports, the connector, a consumer process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from consumer.consumer_process import Samples, wait_until
from consumer.schema import DEMO_KEY_COLUMN
from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# Apart from a developer's `.stack` (defaults) and the tests' `.stack-test`, so all three can run at once.
BENCH_STACK_ENV = {
    "CDC_STACK_DIR": str(REPO / ".stack-bench"),
    "CDC_STACK_PG_PORT": "56439",
    "CDC_STACK_KAFKA_PORT": "39092",
    "CDC_STACK_KAFKA_CONTROLLER_PORT": "39093",
    "CDC_STACK_CONNECT_PORT": "38083",
    "CDC_LOG_FORMAT": "json",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def create_source_table(settings: Settings) -> None:
    """The demo source table (its updated_at, now() at insert, is a one-row insert's commit time) and the
    publication Debezium reads it through."""
    from consumer.connectors import publication_name, signal_table_name
    from consumer.schema import create_demo_source_table

    async def create() -> None:
        async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
            await create_demo_source_table(
                conn, settings, publication_name(settings), signal_table_name(settings)
            )

    asyncio.run(create())


def bench_env(model_folder: Path) -> dict[str, str]:
    """The caller's CDC_* settings, with the bench's stack folder, ports and model on top."""
    inherited = {k: v for k, v in os.environ.items() if k.startswith("CDC_")}
    return {**inherited, **BENCH_STACK_ENV, "CDC_MODEL": str(model_folder)}


def histogram_buckets(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) buckets of a histogram's growth between two scrapes."""
    growth: dict[float, float] = {}
    for (metric, labels), value in after.items():
        if metric == f"{name}_bucket":
            bound = float(dict(labels)["le"])
            growth[bound] = value - before.get((metric, labels), 0.0)
    return sorted(growth.items())


def set_connector_paused(settings: Settings, name: str, paused: bool, timeout_s: float = 60) -> None:
    """PUT /connectors/<name>/pause|resume and wait until its state says so."""
    base = settings.connect_rest_url
    httpx.put(f"{base}/connectors/{name}/{'pause' if paused else 'resume'}", timeout=30).raise_for_status()
    want = "PAUSED" if paused else "RUNNING"

    def reached() -> bool:
        status = httpx.get(f"{base}/connectors/{name}/status", timeout=30).json()
        states = [status["connector"]["state"], *(t["state"] for t in status.get("tasks", []))]
        return all(s == want for s in states)

    wait_until(reached, timeout_s, f"connector {name} to be {want}", every_s=0.5)


def vector_count(conn: psycopg.Connection[Any], settings: Settings, low: int, high: int) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {key} >= %s AND {key} < %s AND embedding IS NOT NULL").format(
            sql.Identifier(*settings.target), key=sql.Identifier(DEMO_KEY_COLUMN)
        ),
        (low, high),
    ).fetchone()
    conn.commit()
    return int(row[0]) if row else 0
