"""`cdc-embedder backfill` on the real stack: rows without a vector get one through Debezium's
incremental snapshot, and rows whose vector is there cost no model call."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer.connectors import publication_name, register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import cli, corpus_rows, insert_rows, wait_consistent

pytestmark = pytest.mark.integration
WHERE = "id >= 3700000 AND id < 3800000"


def backfill(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(env, "backfill", *args)


def test_backfill_fills_missing_vectors_and_skips_current_ones(
    pipeline: ConsumerProcess, env: dict[str, str], settings: Settings, db: psycopg.Connection[Any]
) -> None:
    rows = corpus_rows(40, skip=3700, id_base=3_700_000)
    ids = [r["id"] for r in rows]
    insert_rows(db, rows)
    wait_consistent(db, settings, ids, timeout_s=300)
    lost = ids[::4]  # drift: vectors gone, say restored from an old backup
    db.execute("DELETE FROM public.document_embeddings WHERE id = ANY(%s)", (lost,))
    db.commit()

    dry = backfill(env, "--where", WHERE, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would snapshot 40 rows of {settings.source_table}: {len(lost)} to embed" in dry.stdout, (
        dry.stdout
    )
    assert "tokens" in dry.stdout
    assert db.execute(
        "SELECT count(*) FROM public.document_embeddings WHERE id = ANY(%s)", (lost,)
    ).fetchone() == (0,)
    db.commit()

    embedded = pipeline.metric_sum("cdc_embedder_texts_embedded_total")
    skipped = pipeline.metric_sum("cdc_embedder_events_total", op="snapshot", outcome="superseded")
    done = backfill(env, "--where", WHERE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 of 40 snapshot rows" in done.stdout, done.stdout
    wait_consistent(db, settings, ids, timeout_s=300)
    wait_until(
        lambda: (
            pipeline.metric_sum("cdc_embedder_events_total", op="snapshot", outcome="superseded")
            >= skipped + len(ids) - len(lost)
        ),
        60,
        "the current rows' snapshot rows to be applied",
    )
    assert pipeline.metric_sum("cdc_embedder_texts_embedded_total") - embedded == len(lost)


def test_backfill_embeds_a_table_that_existed_before_the_connector(
    stack: LocalStack, env: dict[str, str], settings: Settings, logs_dir: Path
) -> None:
    """The everyday start: the pipeline is added to a table that already holds rows."""
    table_env = {
        **env,
        "CDC_SOURCE_TABLE": "public.preexisting",
        "CDC_VECTOR_TABLE": "public.preexisting_embeddings",
        "CDC_CONSUMER_GROUP": "preexisting",
    }
    table = Settings.from_env_map(table_env)
    rows = corpus_rows(25, skip=3800, id_base=3_800_000)
    with psycopg.connect(settings.dsn, autocommit=True) as db:
        db.execute("CREATE TABLE public.preexisting (id bigint PRIMARY KEY, title text, body text)")
        db.cursor().executemany(
            "INSERT INTO public.preexisting (id, title, body) VALUES (%(id)s, %(title)s, %(body)s)", rows
        )
        db.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE public.preexisting").format(
                sql.Identifier(publication_name(settings))
            )
        )
    register_connector(settings, tables=(table.source_table,), progress=print)
    consumer = ConsumerProcess(table_env, logs_dir / "preexisting.log").start()
    try:
        done = backfill(table_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "25 of 25 snapshot rows" in done.stdout, done.stdout
        consumer.wait_ready()
        with psycopg.connect(settings.dsn) as db:
            wait_consistent(db, table, [r["id"] for r in rows], timeout_s=300)
    finally:
        assert consumer.stop() == 0, consumer.tail()
        register_connector(settings, progress=print)
