"""Every supported primary-key type on the real stack: Postgres -> Debezium -> Kafka -> consumer.

For each of bigint, uuid, text, numeric and a two-column key, a table of its own is captured by the
connector and embedded by a consumer process of its own, and every path is taken: insert, update,
an update that leaves the text unchanged, an update that leaves a large TOASTed text out of the event
(read back from the source by key), a text that becomes empty, delete, a primary-key change and
TRUNCATE.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer.connectors import publication_name, register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import CORPUS, wait_consistent
from tests.key_types import KEY_TYPES, KeyType

pytestmark = pytest.mark.integration


def source_table(kt: KeyType) -> str:
    return f"public.kt_{kt.name}"


@pytest.fixture(scope="module")
def captured(stack: LocalStack, settings: Settings) -> Iterator[None]:
    """The key-type tables, in the publication and in the connector's include list."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        for kt in KEY_TYPES.values():
            kt.create_source(conn, "public", f"kt_{kt.name}")
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS tags text[]").format(
                sql.Identifier("public", f"kt_{kt.name}")
            ))  # fmt: skip
            listed = conn.execute(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND tablename = %s",
                (publication_name(settings), f"kt_{kt.name}"),
            ).fetchone()
            if listed is None:
                conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                    sql.Identifier(publication_name(settings)), sql.Identifier("public", f"kt_{kt.name}")
                ))  # fmt: skip
    tables = tuple(source_table(kt) for kt in KEY_TYPES.values())
    register_connector(settings, tables=tables, progress=print)
    yield
    register_connector(settings, progress=print)


def longest_corpus_text() -> str:
    longest = ""
    with CORPUS.open() as f:
        for line in f:
            if len(line) > len(longest):
                longest = line
    text: str = json.loads(longest)["text"]
    return text


@pytest.mark.parametrize("name", sorted(KEY_TYPES))
def test_every_path_for_the_key_type(
    captured: None, env: dict[str, str], settings: Settings, logs_dir: Path, name: str
) -> None:
    kt = KEY_TYPES[name]
    table_env = {
        **env,
        "CDC_SOURCE_TABLE": source_table(kt),
        "CDC_VECTOR_TABLE": f"public.kt_{kt.name}_embeddings",
        "CDC_CONSUMER_GROUP": f"kt-{kt.name}",
    }
    table = Settings.from_env_map(table_env)
    schema, tab = table.source
    long_text = longest_corpus_text()

    def upsert(conn: psycopg.Connection[Any], n: int, title: str | None, body: str | None) -> None:
        kt.upsert_row(conn, schema, tab, n, title, body)

    def update(conn: psycopg.Connection[Any], n: int, assignment: str, *values: Any) -> None:
        conn.execute(
            sql.SQL("UPDATE {} SET " + assignment + " WHERE {}").format(
                sql.Identifier(schema, tab), kt.match()
            ),
            (*values, *kt.values(n)),
        )

    consumer = ConsumerProcess(table_env, logs_dir / f"kt-{kt.name}.log").start()
    try:
        with psycopg.connect(table.dsn, autocommit=True) as db:
            for n in range(1, 8):
                upsert(db, n, f"row {n} of {kt.name}", long_text if n == 2 else f"the body of row {n}")
            consumer.wait_ready()
            keys = [kt.values(n) for n in range(1, 10)]
            wait_consistent(db, table, keys, timeout_s=240)
            embedded = consumer.metric_sum("cdc_embedder_texts_embedded_total")

            update(db, 1, "body = %s", "a new body about sailing boats")
            update(db, 2, "title = %s", "a new title over a TOASTed body")  # body arrives as a placeholder
            update(db, 3, "tags = %s", ["unrelated"])  # same text: no model call
            update(db, 4, "title = NULL, body = '  '")  # no text: no vector
            db.execute(
                sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(schema, tab), kt.match()),
                kt.values(5),
            )
            # a primary-key change: Debezium sends a delete of the old key and a create of the new one
            update(db, 6, ", ".join(f"{c} = %s" for c, _ in kt.columns), *kt.values(8))
            wait_until(
                lambda: consumer.metric_sum("cdc_embedder_events_total", outcome="no_text") >= 1,
                120,
                "no_text",
            )
            wait_consistent(db, table, keys, timeout_s=120)
            assert consumer.metric_sum("cdc_embedder_texts_embedded_total") - embedded == 3  # rows 1, 2 and 8
            assert consumer.metric_sum("cdc_embedder_events_total", outcome="unchanged") >= 1
            assert toasted(db, table, kt, 2), "the long body is not TOASTed: the lookup path was not taken"

            cleared = consumer.metric_sum("cdc_embedder_events_total", outcome="table_cleared")
            db.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, tab)))
            upsert(db, 9, "after the truncate", "inserted after it")
            wait_until(
                lambda: consumer.metric_sum("cdc_embedder_events_total", outcome="table_cleared") > cleared,
                120,
                "the truncate",
            )
            wait_consistent(db, table, keys, timeout_s=120)
            assert vector_count(db, table) == 1
            events = consumer.metric_sum("cdc_embedder_events_total")  # every record of the topic
            replay_changes_nothing(table_env, logs_dir / f"kt-{kt.name}-replay.log", db, table, events)
    finally:
        assert consumer.stop() == 0, consumer.tail()


def replay_changes_nothing(
    table_env: dict[str, str], log_file: Path, db: psycopg.Connection[Any], table: Settings, events: float
) -> None:
    """A new group reads the whole topic again: keys read back must match keys decoded, so nothing
    is embedded again and no row changes."""
    before = rows_of(db, table)
    replay = ConsumerProcess(
        {**table_env, "CDC_CONSUMER_GROUP": f"{table_env['CDC_CONSUMER_GROUP']}-replay"}, log_file
    )
    replay.start().wait_ready()
    try:
        wait_until(
            lambda: replay.metric_sum("cdc_embedder_events_total") >= events,
            180,
            "the replaying consumer to catch up",
        )
        assert replay.metric_sum("cdc_embedder_texts_embedded_total") == 0
    finally:
        assert replay.stop() == 0, replay.tail()
    assert rows_of(db, table) == before


def rows_of(db: psycopg.Connection[Any], table: Settings) -> list[tuple[Any, ...]]:
    rows = db.execute(
        sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(*table.target))
    ).fetchall()
    return [tuple(str(v) for v in row) for row in rows]


def toasted(db: psycopg.Connection[Any], table: Settings, kt: KeyType, n: int) -> bool:
    """Whether row n's body is stored out of line, so an update that leaves it alone omits it."""
    row = db.execute(
        sql.SQL("SELECT pg_column_size(body) < octet_length(body) FROM {} WHERE {}").format(
            sql.Identifier(*table.source), kt.match()
        ),
        kt.values(n),
    ).fetchone()
    return bool(row and row[0])


def vector_count(db: psycopg.Connection[Any], table: Settings) -> int:
    row = db.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NOT NULL").format(sql.Identifier(*table.target))
    ).fetchone()
    return int(row[0]) if row else 0
