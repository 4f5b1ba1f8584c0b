"""Vectors in a database of their own (CDC_STACK_VECTOR_DATABASE / CDC_VECTOR_DATABASE_URL), on the
real stack: Debezium reads the source database, the consumer writes vectors and chunks to a second
Postgres, and the source database holds none of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer.bench.model import CORPUS
from consumer.connectors import register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from consumer.stack import LocalStack
from consumer.stack.postgres import EmbeddedPostgres
from tests.harness import cli, wait_consistent
from tests.key_types import KEY_TYPES

pytestmark = pytest.mark.integration

DOCS = KEY_TYPES["uuid"]
SOURCE, VECTORS = "vdb_docs", "vdb_doc_vectors"
NOTES = {
    2: "ferries across the harbour",
    3: "a recipe for lentil soup",
    4: "repairing a bicycle chain",
    5: "chess",
}


@pytest.fixture(scope="module")
def split(stack: LocalStack, env: dict[str, str], settings: Settings) -> Iterator[dict[str, str]]:
    """The env of a consumer whose vectors live in the stack's second Postgres, started here."""
    split_env = {
        **env,
        "CDC_STACK_VECTOR_DATABASE": "true",
        "CDC_SOURCE_TABLE": f"public.{SOURCE}",
        "CDC_VECTOR_TABLE": f"public.{VECTORS}",
        "CDC_CHUNKING": "chunk",
        "CDC_CONSUMER_GROUP": "vector-database",
    }
    split_settings = Settings.from_env_map(split_env)
    assert split_settings.separate_vector_database
    LocalStack(split_settings).up(progress=print)  # the rest runs already: only the second Postgres starts
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        DOCS.create_source(conn, "public", SOURCE)
    cli(split_env, "connector", "register")
    yield split_env
    register_connector(settings, progress=print)  # the session's connector captures documents again
    EmbeddedPostgres(split_settings, vectors=True).stop(progress=print)


def regclass(conn: psycopg.Connection[Any], name: str) -> Any:
    row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    return row[0] if row else None


def count(conn: psycopg.Connection[Any], table: tuple[str, str], n: int | None = None) -> int:
    where = DOCS.match() if n is not None else sql.SQL("true")
    params = DOCS.values(n) if n is not None else ()
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(sql.Identifier(*table), where)
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def test_the_whole_pipeline_with_vectors_in_another_database(
    split: dict[str, str], logs_dir: Path, db: psycopg.Connection[Any]
) -> None:
    view = Settings.from_env_map(split)
    with CORPUS.open() as f:
        longest = max((json.loads(line)["text"] for line in f), key=len)
    db.autocommit = True
    consumer = ConsumerProcess(split, logs_dir / "vector-database.log").start()
    try:
        DOCS.upsert_row(db, "public", SOURCE, 1, "manual", longest)
        for n, note in NOTES.items():
            DOCS.upsert_row(db, "public", SOURCE, n, f"note {n}", note)
        consumer.wait_ready()
        ids = [DOCS.values(n) for n in range(1, 6)]
        wait_consistent(db, view, ids, timeout_s=240)  # the product's audit, reading both databases

        with psycopg.connect(view.vector_dsn, autocommit=True) as vectors:
            assert count(vectors, view.target) == 5 and count(vectors, view.chunk_target, 1) > 20
            recorded = vectors.execute(
                "SELECT model FROM public.cdc_embedder_targets WHERE vector_table = %s", (view.vector_table,)
            ).fetchone()
            assert recorded is not None
            # an update that leaves the long body out of the event (TOAST): read from the source database
            before = count(vectors, view.chunk_target, 1)
            DOCS.upsert_row(db, "public", SOURCE, 1, "a renamed manual", longest)
            wait_consistent(db, view, ids, timeout_s=120)
            first = vectors.execute(
                sql.SQL("SELECT chunk_text FROM {} WHERE {} AND chunk_index = 0").format(
                    sql.Identifier(*view.chunk_target), DOCS.match()
                ),
                DOCS.values(1),
            ).fetchone()
            assert first is not None and first[0].startswith("a renamed manual")
            assert count(vectors, view.chunk_target, 1) == before
            assert consumer.metric_sum("cdc_embedder_events_total", outcome="embedded") >= 6

            # the source database does no vector work: none of the pipeline's tables, nor its state
            assert regclass(db, f"public.{VECTORS}") is None
            assert regclass(db, f"public.{VECTORS}_chunks") is None
            if regclass(db, "public.cdc_embedder_targets") is not None:
                mine = db.execute(
                    "SELECT 1 FROM public.cdc_embedder_targets WHERE vector_table = %s", (view.vector_table,)
                ).fetchone()
                assert mine is None

            # search, audit and a backfill's plan work across the two
            found = cli(split, "search", "-k", "2", "how to cook lentil soup").stdout
            assert f"[{DOCS.values(3)[0]}]" in found.splitlines()[1], found
            audited = cli(split, "audit")
            assert audited.returncode == 0, audited.stdout + audited.stderr
            planned = cli(split, "backfill", "--dry-run").stdout
            assert "5 rows of public.vdb_docs" in planned and "another database" in planned

            delete = sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier("public", SOURCE), DOCS.match())
            db.execute(delete, DOCS.values(1))
            wait_until(lambda: count(vectors, view.chunk_target, 1) == 0, 120, "the delete's chunks to go")
            wait_consistent(db, view, ids, timeout_s=60)
    finally:
        assert consumer.stop() == 0
