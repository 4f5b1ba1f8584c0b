"""Semantic search over the vector table: proof for a user that the vectors work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from consumer.embedder import Embedder
from consumer.settings import Settings


@dataclass(frozen=True, slots=True)
class Hit:
    key: Any
    similarity: float  # cosine similarity, 1 is identical
    preview: str


async def search(
    conn: AsyncConnection[Any], settings: Settings, embedder: Embedder, query: str, k: int
) -> list[Hit]:
    """The k nearest rows by cosine distance, through the HNSW index; `conn` speaks pgvector."""
    vector = embedder.embed([query]).vectors[0]
    key = sql.Identifier(settings.key_column)
    statement = sql.SQL(
        """
        SELECT v.{key}, 1 - (v.embedding <=> %(q)s) AS similarity, left(s.{preview}, 120)
        FROM {vt} v LEFT JOIN {st} s ON s.{key} = v.{key}
        WHERE v.embedding IS NOT NULL
        ORDER BY v.embedding <=> %(q)s
        LIMIT %(k)s
        """
    ).format(
        key=key,
        preview=sql.Identifier(settings.text_column_list[0]),
        vt=sql.Identifier(*settings.target),
        st=sql.Identifier(*settings.source),
    )
    cur = await conn.execute(statement, {"q": vector, "k": k})
    return [Hit(row[0], float(row[1]), (row[2] or "").replace("\n", " ")) for row in await cur.fetchall()]
