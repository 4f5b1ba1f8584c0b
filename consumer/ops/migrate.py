"""`cdc-embedder migrate`: move a search to another model without a gap.

Searches read a view (`search_view` of the pipelines), never a vector table. A model change declares a
second pipeline of the same source with the new embedder, a vector table of its own and the same
`search_view`; the consumer writes every change to both, and `cdc-embedder backfill NEW` fills the new
one. Once it holds a vector for every row with text, `switch` re-points the view in one transaction:
a search runs wholly before or wholly after it (it holds the view's lock while it runs), so it sees one
model, never none. `rollback` points it back; `retire` drops the old vector table once no pipeline
writes it.

Which pipeline serves each view is kept in `<view schema>.cdc_embedder_views`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from consumer import metrics
from consumer.errors import OperatorError
from consumer.schema import source_key
from consumer.settings import Settings
from consumer.spec import PipelineSpec, load_pipelines
from consumer.targets import with_recorded_model

REGISTRY = "cdc_embedder_views"


class MigrateError(OperatorError):
    """A migrate command cannot do what it was asked; the message says what to do first."""


@dataclass(frozen=True, slots=True)
class Progress:
    pipeline: str
    model: str
    vector_table: str
    vectors: int  # rows with a vector of this pipeline's model
    pending: int  # source rows with text that have none yet
    served: bool

    @property
    def share(self) -> float:
        total = self.vectors + self.pending
        return self.vectors / total if total else 1.0

    def describe(self, earlier: Progress, seconds: float) -> str:
        rate = (earlier.pending - self.pending) / seconds
        eta = (
            "complete"
            if not self.pending
            else f"ETA {self.pending / rate:.0f} s"
            if rate > 0
            else "not advancing: is `cdc-embedder backfill` running?"
        )
        return (
            f"{self.pipeline}: {'serves' if self.served else 'builds'} {self.model} in {self.vector_table}: "
            f"{self.vectors} vectors, {self.pending} to go ({self.share:.1%}; {eta})"
        )


def _split(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split(".", 1))


def _registry(view: str) -> sql.Identifier:
    return sql.Identifier(view.split(".", 1)[0], REGISTRY)


def serving(settings: Settings, view: str) -> list[PipelineSpec]:
    """The declared pipelines of a search view; an error names the views there are."""
    specs = [spec for spec in load_pipelines(settings) if spec.search_view == view]
    if not specs:
        views = sorted({s.search_view for s in load_pipelines(settings) if s.search_view})
        raise MigrateError(
            f"no pipeline has the search_view {view} (CDC_PIPELINES_FILE); "
            f"views: {', '.join(views) or 'none'}"
        )
    return specs


async def ensure_registry(conn: psycopg.AsyncConnection, view: str) -> None:
    await conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (view text PRIMARY KEY, pipeline text NOT NULL, "
            "vector_table text NOT NULL, previous text, previous_table text, "
            "switched_at timestamptz NOT NULL DEFAULT now())"
        ).format(_registry(view))
    )


async def served_by(conn: psycopg.AsyncConnection, view: str) -> tuple[str | None, str | None, str | None]:
    """(pipeline, previous pipeline, previous vector table) of the view; Nones before its first switch."""
    await ensure_registry(conn, view)
    cur = await conn.execute(
        sql.SQL("SELECT pipeline, previous, previous_table FROM {} WHERE view = %s").format(_registry(view)),
        (view,),
    )
    row = await cur.fetchone()
    return (row[0], row[1], row[2]) if row else (None, None, None)


async def progress(conn: psycopg.AsyncConnection, settings: Settings, view: str) -> list[Progress]:
    current, _, _ = await served_by(conn, view)
    await conn.commit()
    specs = serving(settings, view)
    against = next((s.settings(settings) for s in specs if s.name == current), None)
    return [await _count(conn, spec.settings(settings), against) for spec in specs]


async def _count(conn: psycopg.AsyncConnection, pipeline: Settings, served: Settings | None) -> Progress:
    """Vectors of the pipeline's model, and rows with text that lack one; while another target serves,
    only rows that one has count as lacking: a row that came a moment ago is in neither yet."""
    pipeline = await with_recorded_model(conn, pipeline)
    info = await source_key(conn, pipeline)
    columns = [sql.Identifier("s", c) for c in pipeline.text_column_list]
    has_text = sql.SQL(" OR ").join(
        sql.SQL("nullif(btrim({}::text), '') IS NOT NULL").format(c) for c in columns
    )
    size = sql.SQL(" + ").join(sql.SQL("coalesce(length({}::text), 0)").format(c) for c in columns)

    def joined(alias: str) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("{a}.{c} = s.{c}").format(a=sql.Identifier(alias), c=sql.Identifier(c))
            for c in info.key_columns
        )

    elsewhere: sql.Composable = sql.SQL("true")
    if served is not None and served.vector_table != pipeline.vector_table:
        elsewhere = sql.SQL("EXISTS (SELECT 1 FROM {} w WHERE {} AND w.embedding IS NOT NULL)").format(
            sql.Identifier(*served.target), joined("w")
        )
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE v.embedding IS NOT NULL AND v.model = %(model)s), "
            "count(*) FILTER (WHERE (v.embedding IS NULL OR v.model IS DISTINCT FROM %(model)s) "
            "AND {elsewhere}) "
            "FROM {source} s LEFT JOIN {target} v ON {joined} WHERE ({has_text}) AND {size} <= %(limit)s"
        ).format(
            elsewhere=elsewhere,
            source=sql.Identifier(*pipeline.source),
            target=sql.Identifier(*pipeline.target),
            joined=joined("v"),
            has_text=has_text,
            size=size,
        ),
        {"model": pipeline.model_identity, "limit": pipeline.max_text_chars},
    )
    row = await cur.fetchone()
    assert row is not None
    await conn.commit()
    is_served = served is not None and served.vector_table == pipeline.vector_table
    return Progress(
        pipeline.pipeline, pipeline.model_identity, pipeline.vector_table, row[0], row[1], is_served
    )


async def switch(conn: psycopg.AsyncConnection, settings: Settings, view: str, to: str, force: bool) -> str:
    """Point the view at pipeline `to`; return the pipeline it served before (or "nothing")."""
    specs = {spec.name: spec for spec in serving(settings, view)}
    if to not in specs:
        raise MigrateError(f"pipeline {to!r} does not serve {view}; those that do: {', '.join(specs)}")
    target = specs[to].settings(settings)
    current, _, _ = await served_by(conn, view)
    if current == to:  # switching again would record the pipeline as its own previous one
        await conn.commit()
        return current
    done = await _count(conn, target, specs[current].settings(settings) if current in specs else None)
    if done.pending and not force:
        raise MigrateError(
            f"{to} still lacks {done.pending} vectors ({done.share:.1%} done): run "
            f"`cdc-embedder backfill {to}` and wait for `cdc-embedder migrate status` to say complete "
            "(or pass --force)"
        )
    info = await source_key(conn, target)
    keys = sql.SQL(", ").join(map(sql.Identifier, info.key_columns))
    await conn.commit()  # what ran so far was reads: the switch is a transaction of its own
    async with conn.transaction():
        await conn.execute(
            sql.SQL("SELECT 1 FROM {} WHERE view = %s FOR UPDATE").format(_registry(view)), (view,)
        )
        # the two models' vectors differ in dimension, which CREATE OR REPLACE VIEW cannot change
        await conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(_split(view)))
        await conn.execute(
            sql.SQL(
                "CREATE VIEW {view} AS SELECT {keys}, embedding, model FROM {table} "
                "WHERE embedding IS NOT NULL AND NOT deleted"
            ).format(view=_split(view), keys=keys, table=sql.Identifier(*target.target))
        )
        previous_table = specs[current].vector_table if current in specs else None
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} AS r (view, pipeline, vector_table, previous, previous_table) "
                "VALUES (%(view)s, %(to)s, %(table)s, %(previous)s, %(previous_table)s) "
                "ON CONFLICT (view) DO UPDATE SET pipeline = excluded.pipeline, vector_table = "
                "excluded.vector_table, previous = r.pipeline, previous_table = r.vector_table, "
                "switched_at = now()"
            ).format(_registry(view)),
            {
                "view": view,
                "to": to,
                "table": target.vector_table,
                "previous": current,
                "previous_table": previous_table,
            },
        )
    return current or "nothing"


async def rollback(conn: psycopg.AsyncConnection, settings: Settings, view: str) -> str:
    _, previous, _ = await served_by(conn, view)
    await conn.commit()
    if previous is None:
        raise MigrateError(f"{view} has served one pipeline only: there is nothing to roll back to")
    await switch(conn, settings, view, previous, force=False)
    return previous


async def retire(conn: psycopg.AsyncConnection, settings: Settings, view: str) -> str:
    """Drop the vector table the view served before, once no declared pipeline writes it any more."""
    _, previous, previous_table = await served_by(conn, view)
    await conn.commit()
    if previous is None or previous_table is None:
        raise MigrateError(f"{view} has no previous target to retire")
    if any(spec.name == previous for spec in load_pipelines(settings)):
        raise MigrateError(
            f"pipeline {previous!r} is still declared: remove it from CDC_PIPELINES_FILE and restart the "
            "consumers first (they would write to the dropped table)"
        )
    async with conn.transaction():
        await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_split(previous_table)))
        state = sql.Identifier(previous_table.split(".", 1)[0], "cdc_embedder_targets")
        await conn.execute(sql.SQL("DELETE FROM {} WHERE vector_table = %s").format(state), (previous_table,))
        await conn.execute(
            sql.SQL("UPDATE {} SET previous = NULL, previous_table = NULL WHERE view = %s").format(
                _registry(view)
            ),
            (view,),
        )
    return previous_table


async def export_served_by(
    pool: AsyncConnectionPool, specs: Sequence[PipelineSpec], every_s: float = 30.0
) -> None:
    """Keep `cdc_embedder_search_view_served_by` current, so a dashboard shows which model answers."""
    views = sorted({spec.search_view for spec in specs if spec.search_view})
    while views:
        for view in views:
            with contextlib.suppress(psycopg.Error):  # the next round tries again; the loop sees outages
                async with pool.connection() as conn:
                    current, _, _ = await served_by(conn, view)
                    await conn.commit()
                for spec in specs:
                    if spec.search_view == view:
                        metrics.SEARCH_VIEW_SERVED_BY.labels(view=view, pipeline=spec.name).set(
                            int(spec.name == current)
                        )
        await asyncio.sleep(every_s)
