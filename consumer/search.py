"""Semantic search over the vector table: proof for a user that the vectors work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from consumer.databases import Databases
from consumer.embedders.base import Embedder
from consumer.key_sql import key_aliases, key_match, key_params, key_text, unnest_keys
from consumer.schema import primary_key, source_key
from consumer.settings import Settings

# Chunks read from the index per document asked for: a long document may hold several of the nearest
# chunks, and the documents are ranked by their best one.
CHUNKS_PER_HIT = 10
PREVIEW_CHARS = 120


@dataclass(frozen=True, slots=True)
class Hit:
    key: tuple[Any, ...]
    similarity: float  # cosine similarity, 1 is identical
    preview: str  # the start of the row's text; in a chunked pipeline, of its best chunk
    chunk_index: int | None = None


async def search(dbs: Databases, settings: Settings, embedder: Embedder, query: str, k: int) -> list[Hit]:
    """The k nearest documents by cosine distance, through the HNSW index; `dbs.vectors` speaks pgvector.

    Only vectors of the query's model are compared: a table may hold rows of an earlier model while
    they are re-embedded (CDC_ON_MODEL_CHANGE=reembed), and distances across models mean nothing.
    """
    vector = embedder.embed([query]).vectors[0]
    params = {"q": vector, "k": k, "model": embedder.name}
    if settings.chunking == "chunk":
        return await _search_chunks(
            dbs.vectors, settings, await primary_key(dbs.vectors, *settings.target), params
        )
    info = await source_key(dbs.source, settings)
    statement = sql.SQL(
        """
        SELECT {keys}, {texts}, 1 - (embedding <=> %(q)s) AS similarity FROM {vt} v
        WHERE embedding IS NOT NULL AND model = %(model)s
        ORDER BY embedding <=> %(q)s
        LIMIT %(k)s
        """
    ).format(
        keys=sql.SQL(", ").join(sql.SQL("v.{}").format(sql.Identifier(c)) for c in info.key_columns),
        texts=key_text("v", info),
        vt=sql.Identifier(*settings.target),
    )
    cur = await dbs.vectors.execute(statement, params)
    n = len(info.key_columns)
    # (the key's values, its text form, similarity)
    nearest = [(tuple(row[:n]), tuple(row[n : 2 * n]), float(row[2 * n])) for row in await cur.fetchall()]
    # the text is the source's: read apart, since the vectors may live in another database
    previews = sql.SQL("SELECT {}, left(s.{}, {}) FROM {} s JOIN unnest({}) AS u({}) ON {}").format(
        key_text("s", info),
        sql.Identifier(settings.text_column_list[0]),
        sql.Literal(PREVIEW_CHARS),
        sql.Identifier(*settings.source),
        unnest_keys("k", n),
        key_aliases(n),
        key_match("s", info),
    )
    cur = await dbs.source.execute(previews, key_params("k", [text for _, text, _ in nearest], n))
    texts = {tuple(row[:n]): row[n] or "" for row in await cur.fetchall()}
    return [Hit(key, similarity, texts.get(text, "").replace("\n", " ")) for key, text, similarity in nearest]


async def _search_chunks(
    conn: AsyncConnection[Any], settings: Settings, key: list[str], params: dict[str, Any]
) -> list[Hit]:
    """One hit per document, ranked by its nearest chunk, which the hit shows. Reads the vector
    database alone: the chunk table has the text."""
    nearest = params["k"] * CHUNKS_PER_HIT
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    statement = sql.SQL(
        """
        WITH nearest AS (
            SELECT {keys}, chunk_index, chunk_text, embedding <=> %(q)s AS distance
            FROM {ct} ORDER BY embedding <=> %(q)s LIMIT %(nearest)s
        ), best AS (
            SELECT DISTINCT ON ({keys}) * FROM nearest ORDER BY {keys}, distance
        )
        SELECT {b_keys}, 1 - b.distance, b.chunk_index, left(b.chunk_text, {chars})
        FROM best b JOIN {vt} v ON {join}
        WHERE v.model = %(model)s AND NOT v.deleted
        ORDER BY b.distance
        LIMIT %(k)s
        """
    ).format(
        keys=keys,
        ct=sql.Identifier(*settings.chunk_target),
        b_keys=sql.SQL(", ").join(sql.SQL("b.{}").format(sql.Identifier(c)) for c in key),
        chars=sql.Literal(PREVIEW_CHARS),
        vt=sql.Identifier(*settings.target),
        join=sql.SQL(" AND ").join(sql.SQL("v.{0} = b.{0}").format(sql.Identifier(c)) for c in key),
    )
    async with conn.transaction():
        # the HNSW scan returns at most ef_search rows (40 by default): as many as are asked for
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(40, nearest)),))
        cur = await conn.execute(statement, {**params, "nearest": nearest})
        rows = await cur.fetchall()
    n = len(key)
    return [
        Hit(tuple(row[:n]), float(row[n]), row[n + 2].replace("\n", " "), int(row[n + 1])) for row in rows
    ]
