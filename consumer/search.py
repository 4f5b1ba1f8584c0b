"""Semantic search over the vector table: proof for a user that the vectors work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from consumer.embedders.base import Embedder
from consumer.schema import source_key
from consumer.settings import Settings


@dataclass(frozen=True, slots=True)
class Hit:
    key: tuple[Any, ...]
    similarity: float  # cosine similarity, 1 is identical
    preview: str


async def search(
    conn: AsyncConnection[Any], settings: Settings, embedder: Embedder, query: str, k: int
) -> list[Hit]:
    """The k nearest rows by cosine distance, through the HNSW index; `conn` speaks pgvector.

    Only vectors of the query's model are compared: a table may hold rows of an earlier model while
    they are re-embedded (CDC_ON_MODEL_CHANGE=reembed), and distances across models mean nothing.
    """
    info = await source_key(conn, settings)
    vector = embedder.embed([query]).vectors[0]
    keys = [sql.Identifier(c) for c in info.key_columns]
    statement = sql.SQL(
        """
        SELECT {v_keys}, 1 - (v.embedding <=> %(q)s) AS similarity, left(s.{preview}, 120)
        FROM {vt} v LEFT JOIN {st} s ON {join}
        WHERE v.embedding IS NOT NULL AND v.model = %(model)s
        ORDER BY v.embedding <=> %(q)s
        LIMIT %(k)s
        """
    ).format(
        v_keys=sql.SQL(", ").join(sql.SQL("v.{}").format(c) for c in keys),
        join=sql.SQL(" AND ").join(sql.SQL("s.{0} = v.{0}").format(c) for c in keys),
        preview=sql.Identifier(settings.text_column_list[0]),
        vt=sql.Identifier(*settings.target),
        st=sql.Identifier(*settings.source),
    )
    cur = await conn.execute(statement, {"q": vector, "k": k, "model": embedder.name})
    n = len(keys)
    return [
        Hit(tuple(row[:n]), float(row[n]), (row[n + 1] or "").replace("\n", " "))
        for row in await cur.fetchall()
    ]
