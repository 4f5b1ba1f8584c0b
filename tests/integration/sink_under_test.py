"""The sink, as the fake of the unit tests or as real pgvector, behind one interface for contract tests.

The real one is a fresh source table and vector table of a given key type in the stack's Postgres,
made by the consumer's own start-up code (`ensure_vector_table`, `ensure_target_state`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import psycopg
from psycopg import sql

from consumer.chunks import ensure_chunk_table
from consumer.schema import ensure_vector_table
from consumer.settings import Settings
from consumer.sink import PgVectorSink, Sink, open_pool
from consumer.targets import ensure_target_state, state_table, target_name
from tests.key_types import KeyType
from tests.unit.fakes import MODEL, FakeSink

SCHEMA = "contract"
DIMENSION = 4  # FakeEmbedder's


class SinkUnderTest(Protocol):
    sink: Sink

    def set_source(self, n: int, title: str | None, body: str | None) -> None: ...

    def set_model(self, n: int, model: str) -> None:
        """Make row n look written by another model."""
        ...

    def chunk_texts(self, n: int) -> list[str]:
        """Row n's chunks in a chunked pipeline, in order."""
        ...


class FakeUnderTest:
    def __init__(self, key_type: KeyType) -> None:
        self.key_type = key_type
        self.fake = FakeSink()
        self.sink: Sink = self.fake

    def set_source(self, n: int, title: str | None, body: str | None) -> None:
        self.fake.source_rows[self.key_type.key_of(n)] = {"title": title, "body": body}

    def set_model(self, n: int, model: str) -> None:
        self.fake.rows[self.key_type.key_of(n)].model = model

    def chunk_texts(self, n: int) -> list[str]:
        return list(self.fake.chunks.get(self.key_type.key_of(n), ()))


class PostgresUnderTest:
    def __init__(self, settings: Settings, key_type: KeyType, sink: Sink) -> None:
        self.settings, self.key_type, self.sink = settings, key_type, sink

    def set_source(self, n: int, title: str | None, body: str | None) -> None:
        with psycopg.connect(self.settings.dsn, autocommit=True) as conn:
            self.key_type.upsert_row(conn, *self.settings.source, n, title, body)

    def set_model(self, n: int, model: str) -> None:
        with psycopg.connect(self.settings.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET model = %s WHERE {}").format(
                    sql.Identifier(*self.settings.target), self.key_type.match()
                ),
                (model, *self.key_type.values(n)),
            )

    def chunk_texts(self, n: int) -> list[str]:
        with psycopg.connect(self.settings.dsn) as conn:
            rows = conn.execute(
                sql.SQL("SELECT chunk_text FROM {} WHERE {} ORDER BY chunk_index").format(
                    sql.Identifier(*self.settings.chunk_target), self.key_type.match()
                ),
                self.key_type.values(n),
            ).fetchall()
        return [row[0] for row in rows]


def table_settings(base: Settings, key_type: KeyType, name: str, **overrides: Any) -> Settings:
    # validated anew, not model_copy: that would carry over the cached derived values of `base`
    return Settings.model_validate(
        base.model_dump()
        | {
            "source_table": f"{SCHEMA}.src_{name}_{key_type.name}",
            "vector_table": f"{SCHEMA}.vec_{name}_{key_type.name}",
            "model": MODEL,
            "key_columns": None,
            "key_column": None,
        }
        | overrides
    )


async def fresh_tables(settings: Settings, key_type: KeyType) -> Any:
    """Drop and create the pair; returns the TableInfo the consumer reads at start."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}, {}").format(
            sql.Identifier(*settings.chunk_target), sql.Identifier(*settings.target),
            sql.Identifier(*settings.source)
        ))  # fmt: skip
        key_type.create_source(conn, *settings.source)
        if conn.execute("SELECT to_regclass(%s)", (state_table(settings).as_string(conn),)).fetchone() != (
            None,
        ):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE vector_table = %s").format(state_table(settings)),
                (target_name(settings),),
            )
    async with await psycopg.AsyncConnection.connect(settings.dsn) as aconn:
        info = await ensure_vector_table(aconn, settings, DIMENSION)
        await ensure_chunk_table(aconn, settings, info, DIMENSION)
        await ensure_target_state(aconn, settings, MODEL, DIMENSION)
    return info


@asynccontextmanager
async def postgres_sink(
    base: Settings, key_type: KeyType, name: str, **overrides: Any
) -> AsyncIterator[PostgresUnderTest]:
    settings = table_settings(base, key_type, name, **overrides)
    info = await fresh_tables(settings, key_type)
    pool = open_pool(settings)
    await pool.open(wait=True, timeout=30)
    try:
        yield PostgresUnderTest(settings, key_type, PgVectorSink(pool, settings, info))
    finally:
        await pool.close()
