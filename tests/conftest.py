"""Session fixtures that start the real stack once: Postgres with pgvector, Kafka, Kafka Connect with the
Debezium connector, and a consumer process. Unit tests never request them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from consumer.connectors import publication_name, register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.schema import create_demo_source_table
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.flaky_consumer import FAIL_ALWAYS, FAIL_TWICE
from tests.harness import corpus_rows, flaky_consumer, insert_rows, stack_env

SEED_IDS = 9_000_000  # rows the `pipeline` fixture inserts, apart from every test's own ids


@pytest.fixture(scope="session")
def env() -> dict[str, str]:
    return stack_env()


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env_map(env)


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    stack = LocalStack(settings)
    stack.down(purge=True, progress=print)  # a clean start, whatever an earlier run left
    stack.up(progress=print)
    asyncio.run(_create_source_table(settings))
    register_connector(settings, progress=print)
    yield stack
    stack.down(purge=True, progress=print)


async def _create_source_table(settings: Settings) -> None:
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        await create_demo_source_table(conn, settings, publication_name(settings))


@pytest.fixture(scope="session")
def db(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.dsn) as conn:
        yield conn


@pytest.fixture(scope="session")
def logs_dir(settings: Settings) -> Path:
    folder = settings.stack_dir / "logs" / "consumers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def produce(
    settings: Settings, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


@pytest.fixture(scope="session")
def pipeline(
    stack: LocalStack, env: dict[str, str], settings: Settings, db: psycopg.Connection[Any], logs_dir: Path
) -> Iterator[ConsumerProcess]:
    """A running consumer that has embedded, retried and dead-lettered something (for the metrics)."""
    consumer = flaky_consumer(env, logs_dir / "pipeline.log").start().wait_ready()
    rows = corpus_rows(20, id_base=SEED_IDS)
    rows[0]["body"] += " " + FAIL_ALWAYS
    rows[1]["body"] += " " + FAIL_TWICE
    insert_rows(db, rows)
    asyncio.run(produce(settings, settings.source_topic, [(b'{"id": 1}', b"\x00garbage")]))
    wait_until(
        lambda: (
            consumer.metric_sum("cdc_embedder_dead_letters_total") >= 2
            and consumer.metric_sum("cdc_embedder_events_total", outcome="embedded") >= 19
        ),
        180,
        "the seeded rows to be embedded, retried and dead-lettered",
    )
    yield consumer
    consumer.stop()
