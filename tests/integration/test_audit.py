"""`cdc-embedder audit [--repair]` on the real stack: drift injected by hand is found with exact counts
and sample keys, `--repair` removes it through the consumer, and the consumer's periodic audit exports
it as gauges. For a bigint, a uuid and a two-column (text, bigint) key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer.cli import DRIFT_EXIT
from consumer.connectors import publication_name, register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.ops.audit import AuditTarget
from consumer.ops.repair import in_key_order
from consumer.schema import TableInfo
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import check_consistency, cli, wait_consistent
from tests.key_types import KEY_TYPES

pytestmark = pytest.mark.integration
NAMES = ("bigint", "uuid", "composite")


@pytest.fixture(scope="module")
def captured(stack: LocalStack, settings: Settings) -> Iterator[None]:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        for name in NAMES:
            table = sql.Identifier("public", f"audit_{name}")
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                table, sql.Identifier("public", f"audit_{name}_embeddings")
            ))  # fmt: skip
            KEY_TYPES[name].create_source(conn, "public", f"audit_{name}")
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(publication_name(settings)), table
            ))  # fmt: skip
    register_connector(settings, tables=tuple(f"public.audit_{n}" for n in NAMES), progress=print)
    yield
    register_connector(settings, progress=print)


@pytest.mark.parametrize("name", NAMES)
def test_audit_finds_injected_drift_and_repair_removes_it(
    captured: None, env: dict[str, str], settings: Settings, logs_dir: Path, name: str
) -> None:
    kt = KEY_TYPES[name]
    table_env = {
        **env,
        "CDC_SOURCE_TABLE": f"public.audit_{name}",
        "CDC_VECTOR_TABLE": f"public.audit_{name}_embeddings",
        "CDC_CONSUMER_GROUP": f"audit-{name}",
        "CDC_AUDIT_INTERVAL_S": "2",
        "CDC_AUDIT_SETTLE_S": "1",
        "CDC_AUDIT_RANGE_ROWS": "7",  # several key ranges over 30 rows
    }
    table = Settings.from_env_map(table_env)
    st, vt = sql.Identifier(*table.source), sql.Identifier(*table.target)
    keys = [kt.values(n) for n in range(1, 31)]

    def on_vector(db: psycopg.Connection[Any], n: int, assignment: str) -> None:
        db.execute(sql.SQL("UPDATE {} SET " + assignment + " WHERE {}").format(vt, kt.match()), kt.values(n))

    def shown(out: str, kind: str, count: int, ns: list[int]) -> None:
        [line] = [line for line in out.splitlines() if line.split()[:1] == [kind]]
        assert line.split()[1] == str(count), out
        for n in ns:
            assert "/".join(kt.key_of(n)) in line, (n, out)

    consumer = ConsumerProcess(table_env, logs_dir / f"audit-{name}.log").start()
    with psycopg.connect(table.dsn, autocommit=True) as db:
        try:
            for n in range(1, 31):
                kt.upsert_row(db, *table.source, n, f"row {n}", f"the body of row {n} of the {name} audit")
            kt.upsert_row(db, *table.source, 8, None, " ")  # no text: no vector, and no drift
            db.execute(sql.SQL("DELETE FROM {} WHERE {}").format(st, kt.match()), kt.values(9))  # a tombstone
            consumer.wait_ready()
            wait_consistent(db, table, keys, timeout_s=240)
        finally:
            assert consumer.stop() == 0, consumer.tail()

        # drift, by hand, while no consumer runs
        db.execute(sql.SQL("DELETE FROM {} WHERE {} OR {}").format(vt, kt.match(), kt.match()),
                   (*kt.values(1), *kt.values(2)))  # fmt: skip
        on_vector(db, 3, "text_sha256 = '\\x00'")
        on_vector(db, 4, "model = 'another/model'")
        db.execute(sql.SQL("UPDATE {} SET body = 'an edit the consumer has not seen' WHERE {}").format(
            st, kt.match()
        ), kt.values(5))  # fmt: skip
        on_vector(db, 6, "deleted = true, embedding = NULL")
        names = sql.SQL(", ").join(sql.Identifier(c) for c, _ in kt.columns)
        db.execute(sql.SQL(  # an orphan a backfill wrote: a snapshot row
            "INSERT INTO {vt} ({names}, embedding, model, text_sha256, source_lsn, snapshot) "
            "SELECT {values}, embedding, model, text_sha256, source_lsn, true FROM {vt} WHERE {match}"
        ).format(vt=vt, names=names, values=sql.SQL(", ").join(sql.Placeholder() * len(kt.columns)),
                 match=kt.match()), (*kt.values(100), *kt.values(7)))  # fmt: skip

        found = cli(table_env, "audit")
        assert found.returncode == DRIFT_EXIT, found.stdout + found.stderr
        assert "audited 29 source rows (28 with text to embed)" in found.stdout, found.stdout
        shown(found.stdout, "missing", 3, [1, 2, 6])
        shown(found.stdout, "stale", 2, [3, 5])
        shown(found.stdout, "wrong_model", 1, [4])
        shown(found.stdout, "orphaned", 1, [100])
        drift = check_consistency(table, None)  # the tests' checker is the same audit
        assert (len(drift.missing), len(drift.stale), len(drift.orphaned)) == (3, 3, 1)

        repaired = cli(table_env, "audit", "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert "repaired: 1 orphans tombstoned, 3 rows released for a snapshot, " in repaired.stdout
        assert "an incremental snapshot asked for 6 keys" in repaired.stdout, repaired.stdout
        # a streamed tombstone: marked as a snapshot row, any streamed event however old would revive it
        tombstone = db.execute(
            sql.SQL("SELECT deleted, snapshot, embedding IS NULL FROM {} WHERE {}").format(vt, kt.match()),
            kt.values(100),
        ).fetchone()
        assert tombstone == (True, False, True)

        consumer = ConsumerProcess(table_env, logs_dir / f"audit-{name}-repair.log").start()
        try:
            consumer.wait_ready()
            wait_consistent(db, table, [*keys, kt.values(100)], timeout_s=240)
            clean = cli(table_env, "audit")
            assert clean.returncode == 0, clean.stdout + clean.stderr
            for kind in ("missing", "stale", "wrong_model", "orphaned"):
                shown(clean.stdout, kind, 0, [])

            # the periodic audit: a new orphan shows in the gauge, and goes once repaired
            db.execute(sql.SQL(
                "INSERT INTO {vt} ({names}, embedding, model, text_sha256, source_lsn) "
                "SELECT {values}, embedding, model, text_sha256, source_lsn FROM {vt} WHERE {match}"
            ).format(vt=vt, names=names, values=sql.SQL(", ").join(sql.Placeholder() * len(kt.columns)),
                     match=kt.match()), (*kt.values(101), *kt.values(7)))  # fmt: skip

            def gauge(kind: str) -> float:
                return consumer.metric_sum("cdc_embedder_drift_rows", kind=kind)

            wait_until(lambda: gauge("orphaned") == 1, 120, "the periodic audit to see the orphan")
            assert gauge("missing") == gauge("stale") == gauge("wrong_model") == 0
            assert consumer.metric_sum("cdc_embedder_audit_last_timestamp_seconds") > 0
            assert cli(table_env, "audit", "--repair").returncode == 0
            wait_until(lambda: gauge("orphaned") == 0, 120, "the periodic audit to see the repair")
        finally:
            assert consumer.stop() == 0, consumer.tail()


async def test_repair_asks_for_keys_in_the_databases_order(stack: LocalStack, settings: Settings) -> None:
    """Key ranges of a targeted snapshot need the keys in the order the database compares them: as
    numbers for a bigint, not as their text."""
    bigint = AuditTarget(
        ("public", "s"), ("public", "v"), TableInfo(("id",), ("bigint",)), ("body",), "m", 10
    )
    composite = AuditTarget(
        ("public", "s"), ("public", "v"), TableInfo(("a", "b"), ("text", "bigint")), ("body",), "m", 10
    )
    async with await psycopg.AsyncConnection.connect(settings.dsn, autocommit=True) as conn:
        assert await in_key_order(conn, bigint, [("100",), ("9",), ("10",)]) == [("9",), ("10",), ("100",)]
        mixed = [("b", "2"), ("a", "10"), ("a", "9")]
        assert await in_key_order(conn, composite, mixed) == [("a", "9"), ("a", "10"), ("b", "2")]
