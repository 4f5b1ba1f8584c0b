"""`cdc-embedder audit --repair`: fix what an audit found, through the consumer wherever a vector is due.

- Orphans (a row of the vector table whose source row is gone) become tombstones, in SQL: a tombstone
  and not a deletion, so that a late older event of the key cannot bring the vector back. A streamed
  tombstone: one still marked as a snapshot row (a backfill wrote the orphan) would let any streamed
  event of the key, however old, win over it (`consumer.sink.guard`). Only keys whose source row
  still does not exist are tombstoned (read just before, from the source database, which may be another
  one than the vectors'), and only where the row is still at the audited position (a newer write won:
  nothing to do). A row inserted after that read commits a change at a higher position, which the sink
  lets win over the tombstone. A chunked pipeline's chunks of a tombstoned key go in the same
  transaction.
- Missing, stale and wrong-model keys get a targeted incremental snapshot (`ops.backfill`), so the
  vectors are made by the consumer, under its guards. A snapshot row only replaces a row another model
  wrote, so rows that block it (a stale vector, a tombstone or a cleared row of a key whose source row
  exists) are first released: their model and hash are cleared, still at the audited position and only
  if the source row exists (read as above; a delete after the read comes with a higher position and
  tombstones the row). Their position stays, so a streamed change keeps its order against them.

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
from consumer.databases import Databases
from consumer.events import Key
from consumer.key_sql import key_aliases, key_match, key_params, key_text, unnest_keys
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
    n = len(t.info.key_columns)
    args = {
        "vt": sql.Identifier(*t.target),
        "unnest": unnest_keys("k", n),
        "aliases": key_aliases(n),
        "t": key_match("t", t.info),
    }
    tombstone = sql.SQL(
        """UPDATE {vt} AS t SET deleted = true, embedding = NULL, model = NULL, text_sha256 = NULL,
            snapshot = false, updated_at = clock_timestamp()
        FROM unnest({unnest}, %(lsns)s::bigint[]) AS u({aliases}, lsn)
        WHERE {t} AND t.source_lsn = u.lsn AND NOT t.deleted
        RETURNING {keys}"""
    ).format(**args, keys=key_text("t", t.info))
    release = sql.SQL(
        """UPDATE {vt} AS t SET deleted = false, model = NULL, text_sha256 = NULL,
            updated_at = clock_timestamp()
        FROM unnest({unnest}, %(lsns)s::bigint[]) AS u({aliases}, lsn)
        WHERE {t} AND t.source_lsn = u.lsn"""
    ).format(**args)
    return tombstone, release


async def in_source(conn: psycopg.AsyncConnection[Any], t: AuditTarget, keys: Sequence[Key]) -> set[Key]:
    """Which of `keys` have a source row now."""
    if not keys:
        return set()
    n = len(t.info.key_columns)
    query = sql.SQL("SELECT {} FROM {} s JOIN unnest({}) AS u({}) ON {}").format(
        key_text("s", t.info),
        sql.Identifier(*t.source),
        unnest_keys("k", n),
        key_aliases(n),
        key_match("s", t.info),
    )
    cur = await conn.execute(query, key_params("k", keys, n))
    return {tuple(row) for row in await cur.fetchall()}


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


async def repair(dbs: Databases, settings: Settings, t: AuditTarget, report: AuditReport) -> RepairResult:
    result = RepairResult()
    arity = len(t.info.key_columns)
    due = [f for f in report.findings if f.kind is not Drift.ORPHANED]
    blocking = [f for f in due if f.row is not None and f.kind is not Drift.WRONG_MODEL]
    present = await in_source(dbs.source, t, [f.key for f in report.findings if f.row is not None])
    orphans = [f for f in report.of(Drift.ORPHANED) if f.key not in present]
    blocking = [f for f in blocking if f.key in present]
    tombstone, release = _updates(t)
    vectors = dbs.vectors
    async with vectors.transaction():
        await vectors.execute(target_lock(t.target_name))
        if orphans:
            cur = await vectors.execute(tombstone, _params(orphans, arity))
            gone = [tuple(row) for row in await cur.fetchall()]
            result.tombstoned = len(gone)
            if gone and settings.chunking == "chunk":
                chunks = ChunkStatements(settings, t.info)
                await vectors.execute(chunks.delete, key_params("d", gone, arity))
        if blocking:
            result.released = (await vectors.execute(release, _params(blocking, arity))).rowcount
    if due:
        # Debezium's filter is run by the source database, so its collation orders the ranges
        keys = await in_key_order(dbs.source, t, [f.key for f in due])
        result.signals.append(await request_backfill(dbs.source, settings, key_filter(dbs.source, t, keys)))
        result.snapshot_keys = len(keys)
    return result
