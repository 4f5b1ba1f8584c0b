"""One model per vector table, checked at start against real Postgres; search compares one model only."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector_async
from psycopg import sql

from consumer.chunks import ensure_chunk_table
from consumer.databases import connect_both
from consumer.schema import SchemaError, ensure_vector_table
from consumer.search import search
from consumer.settings import Settings
from consumer.sink import Kind, Write, WriteBatch, text_hash
from consumer.stack import LocalStack
from consumer.targets import ensure_target_state
from tests.integration.sink_under_test import DIMENSION, postgres_sink
from tests.key_types import KEY_TYPES
from tests.unit.fakes import MODEL, FakeEmbedder, unit_vector

pytestmark = pytest.mark.integration


async def test_another_model_is_refused_unless_told_to_reembed(stack: LocalStack, settings: Settings) -> None:
    async with postgres_sink(settings, KEY_TYPES["uuid"], "models") as real:
        table = real.settings
        async with await psycopg.AsyncConnection.connect(table.dsn) as conn:
            await ensure_target_state(conn, table, MODEL, DIMENSION)  # the same model: fine, again
            with pytest.raises(SchemaError, match="CDC_ON_MODEL_CHANGE=reembed") as refused:
                await ensure_target_state(conn, table, "another-model", DIMENSION)
            assert "CDC_VECTOR_TABLE" in str(refused.value)
            reembed = Settings.model_validate(table.model_dump() | {"on_model_change": "reembed"})
            await ensure_target_state(conn, reembed, "another-model", DIMENSION)
            # now the table is the new model's: the old one is refused in turn
            with pytest.raises(SchemaError):
                await ensure_target_state(conn, table, MODEL, DIMENSION)


async def test_a_table_of_an_older_version_is_judged_by_its_rows(
    stack: LocalStack, settings: Settings
) -> None:
    """No state row yet (a vector table from before it existed): the models in its rows decide."""
    async with postgres_sink(settings, KEY_TYPES["bigint"], "legacy") as real:
        table, kt = real.settings, KEY_TYPES["bigint"]
        vector = unit_vector("x")
        await real.sink.write(WriteBatch([Write(kt.key_of(1), Kind.VECTOR, 10, False, None, b"h", vector)]))
        async with await psycopg.AsyncConnection.connect(table.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DELETE FROM {} WHERE vector_table = %s").format(
                    sql.Identifier(table.target[0], "cdc_embedder_targets")
                ),
                (".".join(table.target),),
            )
            with pytest.raises(SchemaError, match=MODEL):
                await ensure_target_state(conn, table, "a-new-model", DIMENSION)


async def test_search_compares_only_vectors_of_its_model(stack: LocalStack, settings: Settings) -> None:
    kt = KEY_TYPES["text"]
    async with postgres_sink(settings, kt, "search") as real:
        table = real.settings
        for n in (1, 2):
            real.set_source(n, f"title {n}", "body")
        query = "title 1\n\nbody"
        writes = [
            Write(kt.key_of(n), Kind.VECTOR, 10, False, None, text_hash(MODEL, query), unit_vector(query))
            for n in (1, 2)
        ]
        await real.sink.write(WriteBatch(writes))
        real.set_model(2, "an older model")  # identical vector, but of another model
        async with connect_both(table) as dbs:
            await register_vector_async(dbs.vectors)
            hits = await search(dbs, table, FakeEmbedder(), query, 5)
        assert [hit.key for hit in hits] == [kt.values(1)]
        assert np.isclose(hits[0].similarity, 1.0)


async def test_a_text_column_debezium_sends_in_another_form_is_refused(
    stack: LocalStack, settings: Settings
) -> None:
    """A timestamp or jsonb column reads differently from the event than from the table: the hash of an
    unchanged row would differ, and every audit would call it stale."""
    async with await psycopg.AsyncConnection.connect(settings.dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.typed_texts "
            "(id bigint PRIMARY KEY, title varchar(80), body text, published timestamptz, extra jsonb)"
        )
        for columns, refused in (("title,published", "published"), ("title,extra", "extra")):
            typed = Settings.model_validate(
                settings.model_dump()
                | {
                    "source_table": "public.typed_texts",
                    "text_columns": columns,
                    "vector_table": "public.typed_v",
                }
            )
            with pytest.raises(
                SchemaError, match=f"column '{refused}' of public.typed_texts is .*CDC_TEXT_COLUMNS"
            ):
                await ensure_vector_table(conn, typed, DIMENSION)
        fine = Settings.model_validate(
            settings.model_dump()
            | {
                "source_table": "public.typed_texts",
                "text_columns": "title,body",
                "vector_table": "public.typed_v",
            }
        )
        assert (await ensure_vector_table(conn, fine, DIMENSION)).key_columns == ("id",)


async def test_a_table_keeps_the_chunking_mode_it_was_filled_in(
    stack: LocalStack, settings: Settings
) -> None:
    """Document vectors of cut texts and of chunked ones are not alike: switching a filled table from one
    mode to the other is refused, naming what to do instead."""
    kt = KEY_TYPES["text"]
    async with postgres_sink(settings, kt, "modes") as whole:
        write = Write(kt.key_of(1), Kind.VECTOR, 10, False, None, b"h", unit_vector("x"))
        await whole.sink.write(WriteBatch([write]))
        chunked = Settings.model_validate(whole.settings.model_dump() | {"chunking": "chunk"})
        async with await psycopg.AsyncConnection.connect(chunked.dsn) as conn:
            info = await ensure_vector_table(conn, chunked, DIMENSION)
            with pytest.raises(SchemaError, match=r"CDC_VECTOR_TABLE to a new table.*backfill"):
                await ensure_chunk_table(conn, chunked, info, DIMENSION)
    async with postgres_sink(settings, kt, "modes", chunking="chunk") as filled:
        truncating = Settings.model_validate(filled.settings.model_dump() | {"chunking": "truncate"})
        async with await psycopg.AsyncConnection.connect(truncating.dsn) as conn:
            info = await ensure_vector_table(conn, truncating, DIMENSION)
            with pytest.raises(SchemaError, match="CDC_CHUNKING=chunk"):
                await ensure_chunk_table(conn, truncating, info, DIMENSION)
            await ensure_chunk_table(conn, filled.settings, info, DIMENSION)  # its own mode: fine
