"""The two databases a pipeline touches: the source (its tables, Debezium's publication and signal
table) and the vector database (vector, chunk and state tables, search views). They are one database
unless CDC_VECTOR_DATABASE_URL (or the local stack's CDC_STACK_VECTOR_DATABASE) names another, so that a
busy primary does no vector work: it then serves Debezium and the reads of unchanged TOAST text only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from consumer.settings import Settings

Connection = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Databases:
    source: Connection
    vectors: Connection  # the same connection where the vectors live in the source database

    @property
    def separate(self) -> bool:
        return self.source is not self.vectors


@asynccontextmanager
async def connect_both(settings: Settings, autocommit: bool = False) -> AsyncIterator[Databases]:
    """A connection to each database (one, where they are the same)."""
    async with await psycopg.AsyncConnection.connect(settings.vector_dsn, autocommit=autocommit) as vectors:
        if not settings.separate_vector_database:
            yield Databases(vectors, vectors)
            return
        async with await psycopg.AsyncConnection.connect(settings.dsn, autocommit=autocommit) as source:
            yield Databases(source, vectors)
