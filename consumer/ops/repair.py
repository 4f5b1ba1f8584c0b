"""`cdc-embedder audit --repair`: fix what an audit found, through the consumer wherever a vector is due.

- Orphans (a row of the vector table whose source row is gone) become tombstones, in SQL: a tombstone
  and not a deletion, so that a late older event of the key cannot bring the vector back. A streamed
  tombstone: one still marked as a snapshot row (a backfill wrote the orphan) would let any streamed
  event of the key, however old, win over it (`consumer.sink.guard`). The update
  only lands where the source row still does not exist (`NOT EXISTS`, read at READ COMMITTED: a row
  inserted meanwhile commits a change at a higher position, which the sink lets win over the tombstone)
  and where the row is still at the audited position (a newer write won: nothing to do).
- Missing, stale and wrong-model keys get a targeted incremental snapshot (`ops.backfill`), so the
  vectors are made by the consumer, under its guards. A snapshot row only replaces a row another model
  wrote, so rows that block it (a stale vector, a tombstone or a cleared row of a key whose source row
  exists) are first released: their model and hash are cleared, still at the audited position and only
  if the source row exists. Their position stays, so a streamed change keeps its order against them.

Both updates run under the advisory lock the sink's writes share, so none runs during a TRUNCATE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import AdaptContext

from consumer.chunks import ChunkStatements
from consumer.events import Key
from consumer.key_sql import key_params, key_text
from consumer.ops.audit import AuditReport, AuditTarget, Drift, Finding, by_column
from consumer.ops.backfill import request_backfill
from consumer.settings import Settings
from consumer.sink import target_lock

# Debezium's signal table keeps a signal's data in varchar(2048), the snapshot's JSON included.
FILTER_CHARS = 1500


@dataclass(slots=True)
class RepairResult:
    tombstoned: int = 0
    released: int = 0
    snapshot_keys: int = 0
    signals: list[str] = field(default_factory=list)

    def describe(self) -> str:
        asked = f" (signal {', '.join(self.signals)})" if self.signals else ""
        return (
            f"repaired: {self.tombstoned} orphans tombstoned, {self.released} rows released for a snapshot, "
            f"an incremental snapshot asked for {self.snapshot_keys} keys{asked}; the consumer embeds them"
        )


def _updates(t: AuditTarget) -> tuple[sql.Composed, sql.Composed]:
    names = [sql.Identifier(c) for c in t.info.key_columns]
    n = len(names)
    unnest = sql.SQL(", ").join(sql.Placeholder(f"k{i}") + sql.SQL("::text[]") for i in range(n))
    aliases = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(n))

    def match(table: str) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = u.{}::{}").format(sql.Identifier(table), c, sql.Identifier(f"k{i}"), sql.SQL(k))
            for i, (c, k) in enumerate(zip(names, t.info.key_types, strict=True))
        )

    args = {
        "vt": sql.Identifier(*t.target),
        "st": sql.Identifier(*t.source),
        "unnest": unnest,
        "aliases": aliases,
        "t": match("t"),
        "s": match("s"),
    }
    tombstone = sql.SQL(
        """UPDATE {vt} AS t SET deleted = true, embedding = NULL, model = NULL, text_sha256 = NULL,
            snapshot = false, updated_at = clock_timestamp()
        FROM unnest({unnest}, %(lsns)s::bigint[]) AS u({aliases}, lsn)
        WHERE {t} AND t.source_lsn = u.lsn AND NOT t.deleted
            AND NOT EXISTS (SELECT 1 FROM {st} s WHERE {s})
        RETURNING {keys}"""
    ).format(**args, keys=key_text("t", t.info))
    release = sql.SQL(
        """UPDATE {vt} AS t SET deleted = false, model = NULL, text_sha256 = NULL,
            updated_at = clock_timestamp()
        FROM unnest({unnest}, %(lsns)s::bigint[]) AS u({aliases}, lsn)
        WHERE {t} AND t.source_lsn = u.lsn AND EXISTS (SELECT 1 FROM {st} s WHERE {s})"""
    ).format(**args)
    return tombstone, release


def _params(findings: Sequence[Finding], arity: int) -> dict[str, Any]:
    columns = by_column([f.key for f in findings], arity)
    lsns = [f.row.position if f.row else 0 for f in findings]
    return {**{f"k{i}": c for i, c in enumerate(columns)}, "lsns": lsns}


def key_filter(conn: AdaptContext | None, t: AuditTarget, keys: Sequence[Key]) -> str:
    """Debezium's additional condition selecting `keys` (in key order), short enough for its signal.

    Contiguous keys are grouped into ranges, fewer and wider until the condition fits: a wider range
    also snapshots the rows between, which costs no model call where their vector is current.
    """
    row = sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, t.info.key_columns)))

    def value(key: Key) -> sql.Composable:
        return sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(k))
                for v, k in zip(key, t.info.key_types, strict=True)
            )
        )

    groups = len(keys)
    while True:
        size = -(-len(keys) // groups)
        ranges = [keys[i : i + size] for i in range(0, len(keys), size)]
        condition = sql.SQL(" OR ").join(
            sql.SQL("{} BETWEEN {} AND {}").format(row, value(r[0]), value(r[-1])) for r in ranges
        )
        # parenthesised: Debezium joins the condition to its own chunk bounds with AND
        text = sql.SQL("({})").format(condition).as_string(conn)
        if len(text) <= FILTER_CHARS or groups == 1:
            return text
        groups = max(1, groups // 2)


async def in_key_order(conn: psycopg.AsyncConnection[Any], t: AuditTarget, keys: Sequence[Key]) -> list[Key]:
    """`keys` as the database orders them (its types and collation), as `key_filter`'s ranges need.

    An audit's findings are in key order range by range, but not all: a key found orphaned and then
    missing at the settle re-check comes last in its range, and a range ending before it would skip it.
    """
    n = len(t.info.key_columns)
    aliases = [sql.Identifier(f"k{i}") for i in range(n)]
    query = sql.SQL("SELECT {} FROM unnest({}) AS u({}) ORDER BY {}").format(
        sql.SQL(", ").join(aliases),
        sql.SQL(", ").join(sql.Placeholder() + sql.SQL("::text[]") for _ in aliases),
        sql.SQL(", ").join(aliases),
        sql.SQL(", ").join(
            sql.SQL("{}::{}").format(a, sql.SQL(k)) for a, k in zip(aliases, t.info.key_types, strict=True)
        ),
    )
    cur = await conn.execute(query, by_column(keys, n))
    return [tuple(row) for row in await cur.fetchall()]


async def repair(
    conn: psycopg.AsyncConnection[Any], settings: Settings, t: AuditTarget, report: AuditReport
) -> RepairResult:
    result = RepairResult()
    arity = len(t.info.key_columns)
    orphans = report.of(Drift.ORPHANED)
    due = [f for f in report.findings if f.kind is not Drift.ORPHANED]
    blocking = [f for f in due if f.row is not None and f.kind is not Drift.WRONG_MODEL]
    tombstone, release = _updates(t)
    async with conn.transaction():
        await conn.execute(target_lock(t.target_name))
        if orphans:
            cur = await conn.execute(tombstone, _params(orphans, arity))
            gone = [tuple(row) for row in await cur.fetchall()]
            result.tombstoned = len(gone)
            if gone and settings.chunking == "chunk":
                chunks = ChunkStatements(settings, t.info)
                await conn.execute(chunks.delete, key_params("d", gone, arity))
        if blocking:
            result.released = (await conn.execute(release, _params(blocking, arity))).rowcount
    if due:
        keys = await in_key_order(conn, t, [f.key for f in due])
        result.signals.append(await request_backfill(conn, settings, key_filter(conn, t, keys)))
        result.snapshot_keys = len(keys)
    return result
