"""`cdc-embedder demo`: the whole path on the local stack, from INSERT to a semantic search."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql

from consumer.databases import connect_both
from consumer.embedders import build_embedder
from consumer.embedders.base import Embedder
from consumer.schema import DEMO_KEY_COLUMN, create_demo_source_table
from consumer.search import search
from consumer.settings import Settings

SAMPLE_ROWS = Path(__file__).parent / "data" / "sample_documents.jsonl"
DEMO_QUERIES = ("how do I keep a plant alive", "streaming database changes", "making bread at home")
Say = Callable[[str], None]


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}:{number}: each line must be a JSON object with an 'id'")
    return rows


async def insert_rows(
    conn: psycopg.AsyncConnection[Any], settings: Settings, rows: Iterable[dict[str, Any]]
) -> int:
    """Upsert rows into the source table, columns taken from the rows' keys."""
    count = 0
    async with conn.cursor() as cur:
        for row in rows:
            columns = list(row)
            await cur.execute(
                sql.SQL(
                    "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) DO UPDATE SET {sets}"
                ).format(
                    t=sql.Identifier(*settings.source),
                    cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    vals=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
                    key=sql.Identifier(DEMO_KEY_COLUMN),
                    sets=sql.SQL(", ").join(
                        sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in columns
                    ),
                ),
                [row[c] for c in columns],
            )
            count += 1
    await conn.commit()
    return count


async def count_vectors(conn: psycopg.AsyncConnection[Any], settings: Settings) -> int:
    cur = await conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NOT NULL").format(
            sql.Identifier(*settings.target)
        )
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def print_search(settings: Settings, embedder: Embedder, query: str, k: int, say: Say) -> None:
    async with connect_both(settings) as dbs:
        await register_vector_async(dbs.vectors)
        hits = await search(dbs, settings, embedder, query, k)
    say(f"search {query!r} (top {k}, cosine similarity):")
    for hit in hits:
        chunk = "" if hit.chunk_index is None else f" chunk {hit.chunk_index}:"
        say(f"  {hit.similarity:.3f}  [{', '.join(map(str, hit.key))}]{chunk} {hit.preview}")
    if not hits:
        say("  (no vectors yet)")


async def run_demo(settings: Settings, rows_file: Path | None, say: Say) -> int:
    from consumer.connectors import publication_name, register_connector, signal_table_name
    from consumer.stack import LocalStack

    await asyncio.to_thread(LocalStack(settings).up, say)
    rows = read_rows(rows_file or SAMPLE_ROWS)
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        await create_demo_source_table(
            conn, settings, publication_name(settings), signal_table_name(settings)
        )
        say(f"demo: upserted {await insert_rows(conn, settings, rows)} rows into {settings.source_table}")
    await asyncio.to_thread(register_connector, settings, None, progress=say)
    log_file = settings.stack_dir / "logs" / "consumer.log"
    say(f"demo: starting the consumer (cdc-embedder run, log in {log_file})")
    with log_file.open("ab") as log:
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer.cli",
            "run",
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CDC_LOG_FORMAT": "json"},
        )
    try:
        if not await _wait_for_vectors(settings, len(rows), consumer, say):
            say(f"demo: the consumer stopped; last lines of {log_file}:")
            say("\n".join(log_file.read_text(errors="replace").splitlines()[-15:]))
            return 1
        embedder = await asyncio.to_thread(build_embedder, settings)
        for query in DEMO_QUERIES:
            await print_search(settings, embedder, query, 3, say)
    finally:
        consumer.send_signal(signal.SIGTERM)
        await asyncio.wait_for(consumer.wait(), 60)
    say("demo: done. The stack is still up: `cdc-embedder stack down` stops it, `make run` runs this again.")
    return 0


async def _wait_for_vectors(
    settings: Settings, expected: int, consumer: asyncio.subprocess.Process, say: Say
) -> bool:
    started, last = time.monotonic(), -1
    async with await psycopg.AsyncConnection.connect(settings.vector_dsn, autocommit=True) as conn:
        while consumer.returncode is None:
            try:
                have = await count_vectors(conn, settings)
            except psycopg.errors.UndefinedTable:  # the consumer creates it once its model is loaded
                have = 0
            if have != last:
                say(f"demo: {have}/{expected} rows embedded ({time.monotonic() - started:.0f} s)")
                last = have
            if have >= expected:
                return True
            await asyncio.sleep(1.0)
    return False
