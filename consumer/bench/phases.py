"""Measurements against the running pipeline: bulk throughput, freshness at steady load, insert cost."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from consumer.bench.flops import summary
from consumer.bench.pipeline import vector_count
from consumer.schema import DEMO_KEY_COLUMN
from consumer.settings import Settings

Say = Callable[[str], None]
INSERT = (
    "INSERT INTO public.documents (id, title, body) VALUES (%(id)s, %(title)s, %(body)s) "
    "ON CONFLICT (id) DO UPDATE SET title = excluded.title, body = excluded.body, updated_at = now()"
)


def cycle_rows(path: Path, id_base: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Corpus rows with ids id_base, id_base + 1, ...; starts over at the end of the file."""
    next_id = id_base
    while True:
        with path.open() as f:
            for index, line in enumerate(f):
                if index < skip:
                    continue
                item = json.loads(line)
                yield {"id": next_id, "title": item["package"], "body": item["text"]}
                next_id += 1
        skip = 0


def db_now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    return float(row[0]) if row else time.time()


def wait_embedded(
    conn: psycopg.Connection[Any], settings: Settings, low: int, high: int, timeout_s: float, say: Say
) -> int:
    """Poll until every id in [low, high) has a vector; progress every 10 s. Returns the count."""
    want = high - low
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + 10
    count = vector_count(conn, settings, low, high)
    while count < want and time.monotonic() < deadline:
        time.sleep(0.25)
        count = vector_count(conn, settings, low, high)
        if time.monotonic() >= next_report:
            say(f"  ... {count}/{want} vectors committed")
            next_report += 10
    return count


def bulk_throughput(
    conn: psycopg.Connection[Any], settings: Settings, rows: list[dict[str, Any]], say: Say
) -> dict[str, float]:
    """COPY `rows` into the source table in one transaction; time until the last vector is committed."""
    low, high = rows[0]["id"], rows[-1]["id"] + 1
    started = db_now(conn)
    with conn.cursor() as cur, cur.copy("COPY public.documents (id, title, body) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((row["id"], row["title"], row["body"]))
    conn.commit()
    committed = db_now(conn)
    count = wait_embedded(conn, settings, low, high, max(600.0, len(rows) * 2.0), say)
    found = conn.execute(
        sql.SQL(
            "SELECT extract(epoch FROM max(updated_at))::float8 FROM {} WHERE {key} >= %s AND {key} < %s"
        ).format(sql.Identifier(*settings.target), key=sql.Identifier(DEMO_KEY_COLUMN)),
        (low, high),
    ).fetchone()
    conn.commit()
    last = float(found[0]) if found and found[0] is not None else db_now(conn)
    seconds = last - started
    return {
        "texts": float(len(rows)),
        "embedded": float(count),
        "insert_s": committed - started,
        "seconds": seconds,
        "texts_per_s": count / seconds if seconds > 0 else 0.0,
    }


def steady_load(
    conn: psycopg.Connection[Any],
    settings: Settings,
    rows: Iterator[dict[str, Any]],
    rate: float,
    duration_s: float,
    say: Say,
    every: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Single-row autocommit inserts at `rate`/s for `duration_s`; then freshness per row from the DB.

    Freshness = the vector row's updated_at (clock_timestamp() in the consumer's write) minus the source
    row's updated_at (now() of its insert transaction, i.e. its commit time for a one-row insert).
    """
    conn.autocommit = True
    interval = 1.0 / rate
    started = time.monotonic()
    next_at = started
    next_report = started + 15
    low = high = -1
    inserted = 0
    while (now := time.monotonic()) - started < duration_s:
        if now < next_at:
            time.sleep(next_at - now)
        row = next(rows)
        conn.execute(INSERT, row)
        low = row["id"] if low < 0 else low
        high = row["id"] + 1
        inserted += 1
        next_at += interval
        if every is not None:
            every(time.monotonic() - started)
        if time.monotonic() >= next_report:
            say(f"  ... {inserted} rows in {time.monotonic() - started:.0f} s")
            next_report += 15
    elapsed = time.monotonic() - started
    conn.autocommit = False
    embedded = wait_embedded(conn, settings, low, high, 300, say)
    found = conn.execute(
        sql.SQL(
            "SELECT extract(epoch FROM d.updated_at)::float8, "
            "extract(epoch FROM (v.updated_at - d.updated_at))::float8 "
            "FROM public.documents d JOIN {} v ON v.{key} = d.id "
            "WHERE d.id >= %s AND d.id < %s ORDER BY d.id"
        ).format(sql.Identifier(*settings.target), key=sql.Identifier(DEMO_KEY_COLUMN)),
        (low, high),
    ).fetchall()
    conn.commit()
    first = found[0][0] if found else 0.0
    lags = [float(lag) for _, lag in found]
    return {
        "rate_target": rate,
        "rate_achieved": inserted / elapsed,
        "duration_s": elapsed,
        "inserted": inserted,
        "embedded": embedded,
        "freshness_s": summary(lags),
        "series": [(float(at) - first, float(lag)) for at, lag in found],
    }


def insert_latencies(conn: psycopg.Connection[Any], rows: list[dict[str, Any]], pace_s: float) -> list[float]:
    """Milliseconds of each single-row autocommit insert, one every `pace_s` seconds."""
    conn.autocommit = True
    latencies: list[float] = []
    try:
        for row in rows:
            started = time.perf_counter()
            conn.execute(INSERT, row)
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(pace_s)
    finally:
        conn.autocommit = False
    return latencies
