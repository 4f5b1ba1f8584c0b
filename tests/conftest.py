"""Session fixtures that start the real stack once: Postgres with pgvector, Kafka, Kafka Connect with the
Debezium connector, and a consumer process. Unit tests never request them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumer.connectors import publication_name, register_connector, signal_table_name
from consumer.consumer_process import ConsumerProcess
from consumer.schema import create_demo_source_table
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import create_source_topic, exercise, flaky_consumer, stack_env
from tests.infinity import InfinityServer

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
    asyncio.run(create_source_topic(settings))
    yield stack
    stack.down(purge=True, progress=print)


async def _create_source_table(settings: Settings) -> None:
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        await create_demo_source_table(
            conn, settings, publication_name(settings), signal_table_name(settings)
        )


@pytest.fixture
def db(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection per test: a fault test may restart Postgres under a longer-lived one."""
    with psycopg.connect(settings.dsn) as conn:
        yield conn


@pytest.fixture(scope="session")
def logs_dir(settings: Settings) -> Path:
    folder = settings.stack_dir / "logs" / "consumers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def pipeline(
    stack: LocalStack, env: dict[str, str], settings: Settings, logs_dir: Path
) -> Iterator[ConsumerProcess]:
    """A running consumer that has embedded, retried and dead-lettered something (for the metrics)."""
    consumer = flaky_consumer(env, logs_dir / "pipeline.log").start().wait_ready()
    exercise(consumer, settings, SEED_IDS)
    yield consumer
    consumer.stop()


@pytest.fixture(scope="session")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfinityServer]:
    """The OpenAI-compatible server the openai backend is tested against, started once."""
    server = InfinityServer(tmp_path_factory.mktemp("infinity") / "infinity.log").start()
    yield server
    server.stop()
