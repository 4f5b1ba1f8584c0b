"""Writing vectors to pgvector: one round trip per batch, idempotent and ordered by WAL position.

Every write carries the source position of its change and only lands where it is newer than what the
row holds, so a replayed or late event changes nothing, and a delete leaves a tombstone (no vector, its
position kept) that an older create or update cannot bring back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from consumer.errors import EventError
from consumer.events import Key, join_text
from consumer.schema import TableInfo
from consumer.settings import Settings


def text_hash(model: str, text: str) -> bytes:
    """Hash of what determines a vector: the model and the exact text."""
    return hashlib.sha256(model.encode() + b"\0" + text.encode()).digest()


def source_time(ts_ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ts_ms / 1000, UTC) if ts_ms is not None else None


@dataclass(frozen=True, slots=True)
class Stored:
    text_sha256: bytes | None
    position: int
    deleted: bool


@dataclass(slots=True)
class WriteBatch:
    """Rows to write; each key appears at most once across the three lists."""

    upserts: list[tuple[Key, np.ndarray[Any, Any], bytes, int, int | None]] = field(default_factory=list)
    deletes: list[tuple[Key, int, int | None]] = field(default_factory=list)
    touches: list[tuple[Key, int, int | None]] = field(default_factory=list)  # same text, newer position

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes) + len(self.touches)


class Sink(Protocol):
    async def stored(self, keys: Sequence[Key]) -> dict[Key, Stored]: ...

    async def source_texts(self, keys: Sequence[Key]) -> dict[Key, str | EventError]: ...

    async def write(self, batch: WriteBatch) -> int: ...

    async def ping(self) -> None: ...


class PgVectorSink:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Any]], settings: Settings, info: TableInfo):
        self._pool = pool
        self._settings = settings
        self._model = settings.model
        vschema, vtable = settings.target
        sschema, stable = settings.source
        key = sql.Identifier(settings.key_column)
        keys = info.key_array()
        vt = sql.Identifier(vschema, vtable)
        self._stored_sql = sql.SQL(
            "SELECT {key}, text_sha256, source_lsn, deleted FROM {vt} WHERE {key} = ANY(%s::{keys})"
        ).format(key=key, vt=vt, keys=keys)
        self._texts_sql = sql.SQL("SELECT {key}, {cols} FROM {st} WHERE {key} = ANY(%s::{keys})").format(
            key=key,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in settings.text_column_list),
            st=sql.Identifier(sschema, stable),
            keys=keys,
        )
        self._write_sql = sql.SQL(
            """
            WITH touched AS (
                UPDATE {vt} AS t SET source_lsn = u.lsn, source_ts = u.ts, updated_at = clock_timestamp()
                FROM unnest(%(t_keys)s::{keys}, %(t_lsns)s::bigint[], %(t_ts)s::timestamptz[])
                     AS u(k, lsn, ts)
                WHERE t.{key} = u.k AND u.lsn > t.source_lsn
                RETURNING 1
            ), written AS (
                INSERT INTO {vt} AS t ({key}, embedding, model, text_sha256, source_lsn, source_ts, deleted)
                SELECT * FROM unnest(%(keys)s::{keys}, %(vectors)s::vector[], %(models)s::text[],
                                     %(hashes)s::bytea[], %(lsns)s::bigint[], %(ts)s::timestamptz[],
                                     %(deleted)s::boolean[])
                ON CONFLICT ({key}) DO UPDATE SET
                    embedding = excluded.embedding, model = excluded.model,
                    text_sha256 = excluded.text_sha256, source_lsn = excluded.source_lsn,
                    source_ts = excluded.source_ts, deleted = excluded.deleted,
                    updated_at = clock_timestamp()
                WHERE excluded.source_lsn > t.source_lsn
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM touched) + (SELECT count(*) FROM written)
            """
        ).format(vt=vt, key=key, keys=keys)

    async def stored(self, keys: Sequence[Key]) -> dict[Key, Stored]:
        if not keys:
            return {}
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._stored_sql, (list(keys),))
            return {row[0]: Stored(row[1], row[2], row[3]) for row in await cur.fetchall()}

    async def source_texts(self, keys: Sequence[Key]) -> dict[Key, str | EventError]:
        """Current text of rows whose change event left a TOASTed text column out.

        A row that no longer exists is absent: its delete event is on its way.
        """
        if not keys:
            return {}
        columns = self._settings.text_column_list
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._texts_sql, (list(keys),))
            found: dict[Key, str | EventError] = {}
            for key, *values in await cur.fetchall():
                try:
                    found[key] = join_text(dict(zip(columns, values, strict=True)), columns) or ""
                except EventError as exc:
                    found[key] = exc
            return found

    async def write(self, batch: WriteBatch) -> int:
        """Apply the batch in one statement; returns how many rows it changed (older changes don't)."""
        if not len(batch):
            return 0
        rows: list[tuple[object, ...]] = [
            (k, v, self._model, h, p, source_time(ts), False) for k, v, h, p, ts in batch.upserts
        ]
        rows += [(k, None, None, None, p, source_time(ts), True) for k, p, ts in batch.deletes]
        columns = list(zip(*rows, strict=True)) if rows else [()] * 7
        params = {
            "t_keys": [k for k, _, _ in batch.touches],
            "t_lsns": [p for _, p, _ in batch.touches],
            "t_ts": [source_time(ts) for _, _, ts in batch.touches],
            **{
                name: list(values)
                for name, values in zip(
                    ("keys", "vectors", "models", "hashes", "lsns", "ts", "deleted"), columns, strict=True
                )
            },
        }
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._write_sql, params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")


# A server that vanished without a FIN or RST (a half-open connection) holds a query whose answer is
# awaited forever, and one whose bytes go unacknowledged for some 15 minutes of retransmissions, while the
# event loop ticks and liveness stays green. Keepalives find the dead peer of a waiting connection in
# about a minute; tcp_user_timeout bounds the unacknowledged case. The connection string's own values win.
TCP_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


def open_pool(settings: Settings, min_size: int = 1) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """A pool whose connections speak pgvector's binary format and cannot wait forever."""
    timeout_ms = settings.database_statement_timeout_ms
    # SET rather than the startup packet's `options`, which poolers such as PgBouncer may refuse
    set_timeout = sql.SQL("SET statement_timeout = {}").format(sql.Literal(timeout_ms))

    async def configure(conn: AsyncConnection[Any]) -> None:
        await register_vector_async(conn)
        await conn.set_autocommit(True)
        if timeout_ms:
            await conn.execute(set_timeout)

    given = conninfo_to_dict(settings.dsn)
    keepalives = {k: v for k, v in TCP_KEEPALIVES.items() if k not in given}
    return AsyncConnectionPool(
        settings.dsn,
        min_size=min_size,
        max_size=settings.database_pool_size,
        configure=configure,
        open=False,
        timeout=10,
        check=AsyncConnectionPool.check_connection,
        kwargs={"connect_timeout": 5, "application_name": "cdc-embedder", **keepalives},
    )
