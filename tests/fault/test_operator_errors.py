"""A database that refuses writes for a reason an operator must fix, on the real stack.

After a failover the consumer may find itself connected to a read-only server. That is not a reason to
dead-letter anything: the consumer holds its batch, goes not-ready saying what to fix, and carries on
by itself, losing nothing, once the database takes writes again.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from tests.harness import corpus_rows, wait_consistent

pytestmark = pytest.mark.fault


def read_only(settings: Settings, on: bool) -> None:
    # A reload changes the default of every session that did not set it, the pool's included.
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")


def operator_errors_logged(consumer: ConsumerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in consumer.log_file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "operator error; holding until it is fixed":
            lines.append(entry)
    return lines


def test_a_read_only_database_holds_the_batch_and_recovers_without_a_restart(
    settings: Settings, pipeline: ConsumerProcess
) -> None:
    rows = corpus_rows(30, skip=3600, id_base=3_600_000)
    ids = [r["id"] for r in rows]
    dead = pipeline.metric_sum("cdc_embedder_dead_letters_total")
    logged = len(operator_errors_logged(pipeline))
    pid = pipeline.pid
    read_only(settings, True)
    try:
        # the application's own sessions still write
        with psycopg.connect(settings.dsn, options="-c default_transaction_read_only=off") as db:
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO public.documents (id, title, body) VALUES (%(id)s, %(title)s, %(body)s)",
                    rows,
                )
            db.commit()
        wait_until(
            lambda: pipeline.probe("/readyz") == 503, 60, "readiness to fail on the read-only database"
        )
        wait_until(
            lambda: len(operator_errors_logged(pipeline)) > logged, 30, "the operator error in the log"
        )
        assert pipeline.probe("/livez") == 200
    finally:
        read_only(settings, False)
    wait_until(lambda: pipeline.probe("/readyz") == 200, 120, "readiness once the database takes writes")
    with psycopg.connect(settings.dsn) as db:
        wait_consistent(db, settings, ids, timeout_s=120)
    assert pipeline.pid == pid and pipeline.running(), "recovered by a restart, not by itself"
    assert pipeline.metric_sum("cdc_embedder_dead_letters_total") == dead, "a refusal was dead-lettered"
    [entry, *more] = operator_errors_logged(pipeline)[logged:]
    assert not more, f"the same cause was logged {len(more) + 1} times"
    assert "CDC_DATABASE_URL" in entry["fix"] or "primary" in entry["fix"], entry
