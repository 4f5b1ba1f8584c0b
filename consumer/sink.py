"""Writing vectors to pgvector: one transaction per batch, idempotent and ordered by WAL position.

Every write carries the source position of its change and the guard in SQL (`guard`) decides whether
it lands, so a replayed or late event changes nothing, and a delete leaves a tombstone (no vector, its
position kept) that an older create or update cannot bring back. The guard runs in the database, not
only in the decision before it, because another member may write the same key in between (a source
partition and its retry partition are consumed by different members).

Snapshot rows and streamed changes are not ordered by LSN (`consumer.events.supersedes`): a snapshot
row only fills a key that has no row yet (or one another snapshot wrote, at an older position, or one
of another model), and any streamed change wins over a row a snapshot wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from consumer.chunks import ChunkStatements
from consumer.embedders.base import Chunk
from consumer.errors import EventError
from consumer.events import Key, source_row_text, supersedes
from consumer.key_sql import (
    key_aliases,
    key_casts,
    key_match,
    key_names,
    key_params,
    key_text,
    unnest_keys,
)
from consumer.schema import TableInfo
from consumer.settings import Settings
from consumer.targets import state_table, target_name


def text_hash(model: str, text: str) -> bytes:
    """Hash of what determines a vector: the model and the exact text."""
    return hashlib.sha256(model.encode() + b"\0" + text.encode()).digest()


def target_lock(target: str, exclusive: bool = False) -> sql.Composed:
    """The advisory lock of one vector table: writes (and the audit's repairs) share it, a TRUNCATE takes
    it alone, so that no write reads the old truncate floor while the table is emptied."""
    kind = sql.SQL("" if exclusive else "_shared")
    return sql.SQL("SELECT pg_advisory_xact_lock{}(hashtextextended({}, 0))").format(
        kind, sql.Literal(target)
    )


def source_time(ts_ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ts_ms / 1000, UTC) if ts_ms is not None else None


@dataclass(frozen=True, slots=True)
class Stored:
    text_sha256: bytes | None
    position: int
    deleted: bool
    snapshot: bool = False  # written by a snapshot row, not by a streamed change
    model: str | None = None


@dataclass(frozen=True, slots=True)
class State:
    """What the vector table holds for some keys, and the position of the source's last TRUNCATE."""

    rows: dict[Key, Stored] = field(default_factory=dict)
    truncated_at: int = 0

    def admits(self, key: Key, position: int, snapshot: bool, model: str) -> bool:
        """Whether a change of `key` at `position` would land: the guard, as the decision sees it."""
        return position > self.truncated_at and admits(self.rows.get(key), position, snapshot, model)


def admits(stored: Stored | None, position: int, snapshot: bool, model: str) -> bool:
    """`guard` in Python: does a change (streamed, or a snapshot row) replace what is stored?

    A snapshot row never revives a deleted row (the delete may have come after the read), and it
    replaces a vector of another model whatever its position: that vector is of no use to search.
    """
    if stored is None:
        return True
    if snapshot and stored.deleted:
        return False
    if snapshot and stored.model != model:
        return True
    return supersedes(position, snapshot, stored.position, stored.snapshot)


def guard(incoming: str, position: str) -> sql.Composable:
    """`admits` in SQL, of the stored row `t` and an incoming row (its position column named apart)."""
    e, lsn = sql.Identifier(incoming), sql.Identifier(incoming, position)
    return sql.SQL(
        """CASE WHEN {e}.snapshot
        THEN NOT t.deleted AND ((t.snapshot AND {lsn} > t.source_lsn) OR t.model IS DISTINCT FROM {e}.model)
        ELSE t.snapshot OR {lsn} > t.source_lsn END"""
    ).format(e=e, lsn=lsn)


class Kind(StrEnum):
    VECTOR = "vector"  # a new vector for new text
    CLEARED = "cleared"  # the row exists but has no text to embed: no vector
    DELETED = "deleted"  # the row is gone: a tombstone
    TOUCH = "touch"  # same text as stored: only the position advances, if the stored hash still matches


@dataclass(frozen=True, slots=True)
class Write:
    key: Key
    kind: Kind
    position: int
    snapshot: bool
    source_ts_ms: int | None
    digest: bytes | None = None  # VECTOR: hash of its text; TOUCH: the hash the decision saw stored
    vector: np.ndarray[Any, Any] | None = None
    chunks: tuple[Chunk, ...] = ()  # VECTOR of a chunked pipeline: they replace the key's chunks


@dataclass(slots=True)
class WriteBatch:
    """Rows to write, each key at most once, and the position of a TRUNCATE to apply first."""

    rows: list[Write] = field(default_factory=list)
    truncate_at: int | None = None

    def __len__(self) -> int:
        return len(self.rows) + (self.truncate_at is not None)


@dataclass(frozen=True, slots=True)
class WriteResult:
    landed: frozenset[Key]  # keys whose write the guard let through
    truncated_rows: int = 0


class Sink(Protocol):
    async def stored(self, keys: Sequence[Key]) -> State: ...

    async def source_texts(self, keys: Sequence[Key]) -> dict[Key, str | EventError]: ...

    async def write(self, batch: WriteBatch) -> WriteResult: ...

    async def ping(self) -> None: ...


class PgVectorSink:
    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        settings: Settings,
        info: TableInfo,
        model: str = "",
        source_pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None,
    ):
        self._pool = pool  # of the vector database
        # of the source database, for TOAST lookups only; the same pool where the vectors live there too
        self._source_pool = source_pool or pool
        # the embedder's identity (`Embedder.name`), as in the text hashes; unset: the settings' (CDC_MODEL's)
        self._model = model or settings.model_identity
        self._text_columns = settings.text_column_list
        self._template = settings.text_template
        self._target = target_name(settings)
        self._arity = len(info.key_columns)
        self._sql = _Statements(settings, info)
        self._chunks = ChunkStatements(settings, info) if settings.chunking == "chunk" else None

    def _key_params(self, prefix: str, keys: Sequence[Key]) -> dict[str, list[str]]:
        return key_params(prefix, keys, self._arity)

    async def stored(self, keys: Sequence[Key]) -> State:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                self._sql.stored, {"target": self._target, **self._key_params("k", keys)}
            )
            rows = await cur.fetchall()
        truncated_at = int(rows[0][0]) if rows else 0
        found = {
            tuple(row[1 : 1 + self._arity]): Stored(*row[1 + self._arity :])
            for row in rows
            if row[1] is not None
        }
        return State(found, truncated_at)

    async def source_texts(self, keys: Sequence[Key]) -> dict[Key, str | EventError]:
        """Current text of rows whose change event left a TOASTed text column out.

        A row that no longer exists is absent: its delete event is on its way.
        """
        if not keys:
            return {}
        columns = self._text_columns
        async with self._source_pool.connection() as conn:
            cur = await conn.execute(self._sql.texts, self._key_params("k", keys))
            found: dict[Key, str | EventError] = {}
            for row in await cur.fetchall():
                key, values = tuple(row[: self._arity]), row[self._arity :]
                try:
                    found[key] = source_row_text(values, columns, self._template)
                except EventError as exc:
                    found[key] = exc
            return found

    async def write(self, batch: WriteBatch) -> WriteResult:
        """Apply the batch in one transaction; returns the keys whose write landed."""
        if not len(batch):
            return WriteResult(frozenset())
        touches = [w for w in batch.rows if w.kind is Kind.TOUCH]
        rows = [w for w in batch.rows if w.kind is not Kind.TOUCH]
        params: dict[str, Any] = {
            "target": self._target,
            "model": self._model,
            **self._key_params("t", [w.key for w in touches]),
            "t_hashes": [w.digest for w in touches],
            "t_lsns": [w.position for w in touches],
            "t_ts": [source_time(w.source_ts_ms) for w in touches],
            "t_snapshots": [w.snapshot for w in touches],
            **self._key_params("k", [w.key for w in rows]),
            "vectors": [w.vector for w in rows],
            "models": [None if w.kind is Kind.DELETED else self._model for w in rows],
            "hashes": [w.digest if w.kind is Kind.VECTOR else None for w in rows],
            "lsns": [w.position for w in rows],
            "ts": [source_time(w.source_ts_ms) for w in rows],
            "deleted": [w.kind is Kind.DELETED for w in rows],
            "snapshots": [w.snapshot for w in rows],
        }
        truncated = 0
        async with self._pool.connection() as conn, conn.transaction():
            if batch.truncate_at is not None:
                # exclusive: no write of this table may read the old floor while the table is emptied
                await conn.execute(target_lock(self._target, exclusive=True))
                cur = await conn.execute(
                    self._sql.truncate, {"target": self._target, "at": batch.truncate_at}
                )
                truncated = cur.rowcount
            else:
                await conn.execute(target_lock(self._target))
            cur = await conn.execute(self._sql.write, params)
            landed = frozenset(tuple(row) for row in await cur.fetchall())
            if self._chunks is not None:
                await self._replace_chunks(conn, self._chunks, [w for w in rows if w.key in landed])
        return WriteResult(landed, truncated)

    async def _replace_chunks(
        self, conn: AsyncConnection[Any], statements: ChunkStatements, replaced: list[Write]
    ) -> None:
        """Chunks of the documents whose new state landed: a new text's instead of the old ones, none
        for a delete or a row without text. In the state's transaction, so no search sees a mix."""
        if not replaced:
            return
        await conn.execute(statements.delete, self._key_params("d", [w.key for w in replaced]))
        fresh = [(w.key, index, chunk) for w in replaced for index, chunk in enumerate(w.chunks)]
        if fresh:
            await conn.execute(
                statements.insert,
                {
                    **self._key_params("c", [key for key, _, _ in fresh]),
                    "indexes": [index for _, index, _ in fresh],
                    "texts": [chunk.text for _, _, chunk in fresh],
                    "vectors": [chunk.vector for _, _, chunk in fresh],
                },
            )

    async def ping(self) -> None:
        for pool in dict.fromkeys((self._pool, self._source_pool)):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")


class _Statements:
    """The sink's SQL for one vector table and its source's key (any number of columns, any key type)."""

    def __init__(self, settings: Settings, info: TableInfo) -> None:
        vt, st, state = (
            sql.Identifier(*settings.target),
            sql.Identifier(*settings.source),
            state_table(settings),
        )
        n = len(info.key_columns)
        floor = sql.SQL("(SELECT truncated_lsn FROM {} WHERE vector_table = %(target)s)").format(state)
        self.truncate = sql.SQL(
            """
            WITH floor AS (
                UPDATE {state} SET truncated_lsn = greatest(truncated_lsn, %(at)s),
                    updated_at = clock_timestamp()
                WHERE vector_table = %(target)s
            )
            DELETE FROM {vt} WHERE source_lsn < %(at)s
            """
        ).format(state=state, vt=vt)
        self.stored = sql.SQL(
            """
            SELECT s.truncated_lsn, {keys}, t.text_sha256, t.source_lsn, t.deleted, t.snapshot, t.model
            FROM {state} s LEFT JOIN ({vt} t JOIN unnest({unnest}) AS u({aliases}) ON {match}) ON true
            WHERE s.vector_table = %(target)s
            """
        ).format(
            keys=key_text("t", info),
            state=state,
            vt=vt,
            unnest=unnest_keys("k", n),
            aliases=key_aliases(n),
            match=key_match("t", info),
        )
        self.texts = sql.SQL(
            "SELECT {keys}, {cols} FROM {st} s JOIN unnest({unnest}) AS u({aliases}) ON {match}"
        ).format(
            keys=key_text("s", info),
            cols=sql.SQL(", ").join(
                sql.SQL("s.{}").format(sql.Identifier(c)) for c in settings.text_column_list
            ),
            st=st,
            unnest=unnest_keys("k", n),
            aliases=key_aliases(n),
            match=key_match("s", info),
        )
        self.write = sql.SQL(
            """
            WITH touched AS (
                UPDATE {vt} AS t SET source_lsn = e.lsn, source_ts = e.ts, snapshot = e.snapshot,
                    updated_at = clock_timestamp()
                FROM (
                    SELECT u.*, %(model)s::text AS model FROM unnest({t_unnest}, %(t_hashes)s::bytea[],
                        %(t_lsns)s::bigint[], %(t_ts)s::timestamptz[], %(t_snapshots)s::boolean[])
                        AS u({aliases}, hash, lsn, ts, snapshot)
                ) AS e
                WHERE {t_match} AND t.text_sha256 = e.hash AND NOT t.deleted AND t.model = e.model
                    AND e.lsn > {floor} AND {touch_guard}
                RETURNING {t_keys}
            ), written AS (
                INSERT INTO {vt} AS t ({names}, embedding, model, text_sha256, source_lsn, source_ts, deleted,
                                       snapshot)
                SELECT {casts}, u.embedding, u.model, u.hash, u.lsn, u.ts, u.deleted, u.snapshot
                FROM unnest({k_unnest}, %(vectors)s::vector[], %(models)s::text[], %(hashes)s::bytea[],
                            %(lsns)s::bigint[], %(ts)s::timestamptz[], %(deleted)s::boolean[],
                            %(snapshots)s::boolean[])
                     AS u({aliases}, embedding, model, hash, lsn, ts, deleted, snapshot)
                WHERE u.lsn > {floor}
                ON CONFLICT ({names}) DO UPDATE SET
                    embedding = excluded.embedding, model = excluded.model,
                    text_sha256 = excluded.text_sha256, source_lsn = excluded.source_lsn,
                    source_ts = excluded.source_ts, deleted = excluded.deleted, snapshot = excluded.snapshot,
                    updated_at = clock_timestamp()
                WHERE {upsert_guard}
                RETURNING {t_keys}
            )
            SELECT * FROM touched UNION ALL SELECT * FROM written
            """
        ).format(
            vt=vt,
            t_unnest=unnest_keys("t", n),
            k_unnest=unnest_keys("k", n),
            aliases=key_aliases(n),
            t_match=key_match("t", info, "e"),
            floor=floor,
            touch_guard=guard("e", "lsn"),
            t_keys=key_text("t", info),
            names=key_names(info),
            casts=key_casts(info),
            upsert_guard=guard("excluded", "source_lsn"),  # ON CONFLICT's name for the incoming row
        )


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


def open_pool(
    settings: Settings, min_size: int = 1, dsn: str | None = None
) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """A pool (of the vector database unless `dsn` is given) whose connections speak pgvector's binary
    format and cannot wait forever."""
    dsn = dsn or settings.vector_dsn
    timeout_ms = settings.database_statement_timeout_ms
    # SET rather than the startup packet's `options`, which poolers such as PgBouncer may refuse
    set_timeout = sql.SQL("SET statement_timeout = {}").format(sql.Literal(timeout_ms))

    async def configure(conn: AsyncConnection[Any]) -> None:
        await register_vector_async(conn)
        await conn.set_autocommit(True)
        if timeout_ms:
            await conn.execute(set_timeout)

    given = conninfo_to_dict(dsn)
    keepalives = {k: v for k, v in TCP_KEEPALIVES.items() if k not in given}
    return AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=settings.database_pool_size,
        configure=configure,
        open=False,
        timeout=10,
        check=AsyncConnectionPool.check_connection,
        kwargs={"connect_timeout": 5, "application_name": "cdc-embedder", **keepalives},
    )
