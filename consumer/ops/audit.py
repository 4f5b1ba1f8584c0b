"""`cdc-embedder audit`: compare the source table with its vector table, in key ranges, without locks.

The source is read by keyset pagination over its primary key, `range_rows` keys at a time, each read a
plain statement at READ COMMITTED (ACCESS SHARE only: writers never wait). For each range the vector
rows of the same key range are read and every key is classified (`classify`) with the consumer's own
text (`source_row_text`) and hash (`text_hash`), so the audit cannot disagree with what the consumer
would write. A key that changed in the last moments may be in flight (its event not applied yet), so
candidates are read again after `settle_s`: only those still drifting are reported, the others counted
as `settled`.

The core takes explicit arguments (`AuditTarget`); `AuditTarget.from_settings` adapts today's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql

from consumer import metrics
from consumer.databases import Databases, connect_both
from consumer.events import Key, source_row_text
from consumer.logs import get_logger
from consumer.schema import TableInfo, source_key
from consumer.settings import Settings
from consumer.sink import text_hash
from consumer.targets import with_recorded_model

SAMPLE_KEYS = 10
log = get_logger("cdc_embedder.audit")


class Drift(StrEnum):
    MISSING = "missing"  # a row with text to embed has no vector (no row, a tombstone, or a cleared row)
    ORPHANED = "orphaned"  # a vector-table row (not a tombstone) whose source row is gone
    STALE = "stale"  # a vector not of the row's current text (or of a row with no text to embed)
    WRONG_MODEL = "wrong_model"  # a vector of another model than the configured one


@dataclass(frozen=True, slots=True)
class AuditTarget:
    """One pipeline as the audit sees it: which tables, which key, how text is made and hashed."""

    source: tuple[str, str]
    target: tuple[str, str]
    info: TableInfo
    text_columns: tuple[str, ...]
    model: str
    max_text_chars: int
    text_template: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, info: TableInfo) -> AuditTarget:
        return cls(
            settings.source,
            settings.target,
            info,
            settings.text_column_list,
            settings.model_identity,
            settings.max_text_chars,
            settings.text_template,
        )

    @property
    def target_name(self) -> str:
        return ".".join(self.target)  # as the sink's advisory lock and the state row name it


@dataclass(frozen=True, slots=True)
class VectorRow:
    text_sha256: bytes | None
    model: str | None
    deleted: bool
    has_vector: bool
    position: int  # source_lsn: repairs change the row only if it is still this one


@dataclass(frozen=True, slots=True)
class Finding:
    key: Key
    kind: Drift
    row: VectorRow | None


def embeddable(text: str | None, max_chars: int) -> bool:
    """Whether the consumer gives this text a vector (README: no text, no vector)."""
    return bool(text) and len(text or "") <= max_chars


def classify(text: str | None, row: VectorRow | None, target: AuditTarget) -> Drift | None:
    """The drift of one key: `text` is the source row's text (None: no source row), `row` its vector row."""
    if text is None:
        return Drift.ORPHANED if row is not None and not row.deleted else None
    if not embeddable(text, target.max_text_chars):
        return Drift.STALE if row is not None and row.has_vector else None
    if row is None or row.deleted or not row.has_vector:
        return Drift.MISSING
    if row.model != target.model:
        return Drift.WRONG_MODEL
    return Drift.STALE if row.text_sha256 != text_hash(target.model, text) else None


@dataclass(slots=True)
class AuditReport:
    findings: list[Finding] = field(default_factory=list)
    source_rows: int = 0
    embeddable_rows: int = 0
    settled: int = 0  # drifting at first sight, not after the settle delay: changes in flight
    seconds: float = 0.0

    def of(self, kind: Drift) -> list[Finding]:
        return [f for f in self.findings if f.kind is kind]

    def counts(self) -> dict[Drift, int]:
        return {kind: len(self.of(kind)) for kind in Drift}

    def describe(self, sample: int = SAMPLE_KEYS) -> list[str]:
        lines = [
            f"audited {self.source_rows} source rows ({self.embeddable_rows} with text to embed) "
            f"in {self.seconds:.1f} s; {self.settled} changes in flight settled"
        ]
        for kind, n in self.counts().items():
            keys = ", ".join("/".join(f.key) for f in self.of(kind)[:sample])
            lines.append(f"{kind.value:12} {n}" + (f"  e.g. {keys}" if n else ""))
        return lines


class _Queries:
    """The audit's reads, for any key (any number of columns of the supported types)."""

    def __init__(self, t: AuditTarget) -> None:
        names = [sql.Identifier(c) for c in t.info.key_columns]
        row = sql.SQL("({})").format(sql.SQL(", ").join(names))
        typed = sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(k)) for k in t.info.key_types
            )
        )
        keys = sql.SQL(", ").join(sql.SQL("{}::text").format(n) for n in names)
        texts = sql.SQL(", ").join(map(sql.Identifier, t.text_columns))
        vector = sql.SQL("text_sha256, model, deleted, embedding IS NOT NULL, source_lsn")
        st, vt = sql.Identifier(*t.source), sql.Identifier(*t.target)
        # qualified: a bare name in ORDER BY would be the output column, the key's text
        order = sql.SQL(", ").join(sql.Identifier("x", c) for c in t.info.key_columns)
        self.first = sql.SQL("SELECT {}, {} FROM {} x ORDER BY {} LIMIT %s").format(keys, texts, st, order)
        self.after = sql.SQL("SELECT {}, {} FROM {} x WHERE {} > {} ORDER BY {} LIMIT %s").format(
            keys, texts, st, row, typed, order
        )
        self.lower, self.upper = sql.SQL("{} > {}").format(row, typed), sql.SQL("{} <= {}").format(row, typed)
        self.vectors = sql.SQL("SELECT {}, {} FROM {} WHERE ").format(keys, vector, vt)
        unnest = sql.SQL(", ").join(sql.Placeholder() + sql.SQL("::text[]") for _ in names)
        aliases = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(names)))
        match = sql.SQL(" AND ").join(
            sql.SQL("x.{} = u.{}::{}").format(n, sql.Identifier(f"k{i}"), sql.SQL(k))
            for i, (n, k) in enumerate(zip(names, t.info.key_types, strict=True))
        )
        by_keys = sql.SQL("FROM {} x JOIN unnest({}) AS u({}) ON {}")
        self.source_of = sql.SQL("SELECT {}, {} ").format(keys, texts) + by_keys.format(
            st, unnest, aliases, match
        )
        self.vectors_of = sql.SQL("SELECT {}, {} ").format(keys, vector) + by_keys.format(
            vt, unnest, aliases, match
        )


def by_column(keys: Sequence[Key], arity: int) -> list[list[str]]:
    """Keys as one array per key column, as `unnest` takes them."""
    return [list(c) for c in zip(*keys, strict=True)] if keys else [[] for _ in range(arity)]


class Auditor:
    """Reads and classifies; the connections are in autocommit, so each read is its own READ COMMITTED
    statement."""

    def __init__(self, dbs: Databases, target: AuditTarget) -> None:
        self._source, self._vectors_db, self._t, self._q = dbs.source, dbs.vectors, target, _Queries(target)
        self._n = len(target.info.key_columns)

    def _split(self, rows: list[tuple[Any, ...]]) -> dict[Key, str]:
        return {
            tuple(r[: self._n]): source_row_text(r[self._n :], self._t.text_columns, self._t.text_template)
            for r in rows
        }

    def _vectors(self, rows: list[tuple[Any, ...]]) -> dict[Key, VectorRow]:
        return {
            tuple(r[: self._n]): VectorRow(bytes(r[self._n]) if r[self._n] else None, *r[self._n + 1 :])
            for r in rows
        }

    def _classify(
        self, texts: dict[Key, str], vectors: dict[Key, VectorRow], report: AuditReport
    ) -> list[Finding]:
        report.source_rows += len(texts)
        report.embeddable_rows += sum(embeddable(t, self._t.max_text_chars) for t in texts.values())
        found = []
        for key in [*texts, *(k for k in vectors if k not in texts)]:
            kind = classify(texts.get(key), vectors.get(key), self._t)
            if kind is not None:
                found.append(Finding(key, kind, vectors.get(key)))
        return found

    async def scan(self, range_rows: int, progress: Callable[[int], object] | None = None) -> AuditReport:
        """Every key of both tables once, range by range; the last range is open-ended above."""
        report, after = AuditReport(), None
        while True:
            if after is None:
                cur = await self._source.execute(self._q.first, (range_rows,))
            else:
                cur = await self._source.execute(self._q.after, (*after, range_rows))
            texts = self._split(await cur.fetchall())
            last = list(texts)[-1] if len(texts) == range_rows else None
            bounds = [(self._q.lower, after), (self._q.upper, last)]
            where = [(cond, key) for cond, key in bounds if key is not None]
            condition = sql.SQL(" AND ").join(c for c, _ in where) if where else sql.SQL("true")
            cur = await self._vectors_db.execute(
                self._q.vectors + condition, [v for _, k in where for v in k]
            )
            report.findings += self._classify(texts, self._vectors(await cur.fetchall()), report)
            if progress is not None:
                progress(len(texts))
            if last is None:
                return report
            after = last

    async def of_keys(self, keys: Sequence[Key], range_rows: int) -> AuditReport:
        """The same classification for some keys only."""
        report = AuditReport()
        for i in range(0, len(keys), range_rows):
            params = by_column(keys[i : i + range_rows], self._n)
            texts = self._split(await (await self._source.execute(self._q.source_of, params)).fetchall())
            vectors = self._vectors(
                await (await self._vectors_db.execute(self._q.vectors_of, params)).fetchall()
            )
            report.findings += self._classify(texts, vectors, report)
        order = {key: i for i, key in enumerate(keys)}  # key order, as a repair's key ranges need
        report.findings.sort(key=lambda f: order[f.key])
        return report


async def audit(
    dbs: Databases,
    target: AuditTarget,
    range_rows: int,
    settle_s: float,
    progress: Callable[[int], object] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AuditReport:
    """Scan both tables, then look again at the drifting keys after `settle_s`, so that changes in flight
    (applied between the two reads, or within the settle delay) are not reported as drift."""
    started = time.monotonic()
    auditor = Auditor(dbs, target)
    report = await auditor.scan(range_rows, progress)
    if report.findings and settle_s > 0:
        await sleep(settle_s)
        again = await auditor.of_keys([f.key for f in report.findings], range_rows)
        report.settled = len(report.findings) - len(again.findings)
        report.findings = again.findings
    report.seconds = time.monotonic() - started
    return report


async def audit_pipeline(
    dbs: Databases, settings: Settings, progress: Callable[[int], object] | None = None
) -> tuple[AuditTarget, AuditReport]:
    """The audit of one pipeline, from its settings."""
    settings = await with_recorded_model(dbs.vectors, settings)
    target = AuditTarget.from_settings(settings, await source_key(dbs.source, settings))
    report = await audit(dbs, target, settings.audit_range_rows, settings.audit_settle_s, progress)
    return target, report


async def audit_periodically(pipelines: Sequence[Settings], stop: asyncio.Event) -> None:
    """The consumer's audit of each pipeline every CDC_AUDIT_INTERVAL_S, exported as gauges: on a
    connection of its own (never one of the batches' pool) and in a task of its own, so batches never
    wait for it. A failed audit is logged and tried again at the next interval. The first runs at
    start, so that the gauges exist from then on."""
    interval = pipelines[0].audit_interval_s if pipelines else 0
    while interval and not stop.is_set():
        for settings in pipelines:
            try:
                async with connect_both(settings, autocommit=True) as dbs:
                    _, report = await audit_pipeline(dbs, settings)
                counts = {kind.value: n for kind, n in report.counts().items()}
                metrics.record_audit(settings.pipeline, counts, report.seconds, time.time())
                log.info(
                    "audit",
                    pipeline=settings.pipeline,
                    **counts,
                    settled=report.settled,
                    seconds=round(report.seconds, 1),
                )
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "audit failed; trying again at the next interval",
                    pipeline=settings.pipeline,
                    error=str(exc),
                )
        with contextlib.suppress(TimeoutError):  # the interval passed without a stop
            await asyncio.wait_for(stop.wait(), interval)
