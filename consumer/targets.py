"""What a vector table records about itself: the model that wrote it and its source's last TRUNCATE.

One row per vector table in `<vector schema>.cdc_embedder_targets`. The model is checked at start, so
that vectors of two models never mix in one table unnoticed (their distances mean nothing together).
The truncate position is the floor below which no change may write any more: a TRUNCATE event has no
key, so it cannot leave tombstones for keys it never saw, and an older event of such a key (a retry, a
redelivery) must still not bring a vector back.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from consumer.embedders.openai import identity
from consumer.logs import get_logger
from consumer.schema import SchemaError
from consumer.settings import Settings, env_name

log = get_logger("cdc_embedder.targets")
STATE_TABLE = "cdc_embedder_targets"


def state_table(settings: Settings) -> sql.Identifier:
    return sql.Identifier(settings.target[0], STATE_TABLE)


def target_name(settings: Settings) -> str:
    """The vector table as its state row names it: always schema-qualified."""
    return ".".join(settings.target)


def state_ddl(settings: Settings) -> sql.Composed:
    return sql.SQL(
        """
        CREATE TABLE IF NOT EXISTS {} (
            vector_table  text PRIMARY KEY,
            model         text NOT NULL,
            dimension     integer NOT NULL,
            truncated_lsn bigint NOT NULL DEFAULT 0,
            updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    ).format(state_table(settings))


async def _ensure_state_table(conn: psycopg.AsyncConnection, settings: Settings) -> None:
    cur = await conn.execute("SELECT to_regclass(%s)", (state_table(settings).as_string(conn),))
    row = await cur.fetchone()
    if row is not None and row[0] is not None:
        return  # CREATE ... IF NOT EXISTS would still need CREATE on the schema, which the role may lack
    try:
        await conn.execute(state_ddl(settings))
        await conn.commit()
    except psycopg.errors.InsufficientPrivilege:
        await conn.rollback()
        raise SchemaError(
            f"the consumer may not create {state_table(settings).as_string(conn)}: run deploy/sql/schema.sql "
            "as the schema's owner (it creates the table and roles.sql grants it)"
        ) from None


async def ensure_target_state(
    conn: psycopg.AsyncConnection, settings: Settings, model: str, dimension: int
) -> None:
    """Record the model of the vector table, or refuse a model other than the one that wrote it."""
    await _ensure_state_table(conn, settings)
    name = target_name(settings)
    cur = await conn.execute(
        sql.SQL("SELECT model FROM {} WHERE vector_table = %s").format(state_table(settings)), (name,)
    )
    row = await cur.fetchone()
    written_by = str(row[0]) if row else await _model_of_existing_rows(conn, settings, model)
    if written_by is not None and written_by != model:
        if settings.on_model_change == "refuse":
            raise SchemaError(
                f"{settings.vector_table} holds vectors of model {written_by!r}, not of {model!r}, and "
                f"vectors of two models never compare: set {env_name('vector_table')} to a new table "
                f"(and backfill it), or {env_name('on_model_change')}=reembed to re-embed its rows as they "
                f"change (search then returns only rows of the new model)"
            )
        log.warning(
            "the vector table was written by another model; its rows are re-embedded as they change",
            vector_table=name,
            previous_model=written_by,
            model=model,
        )
    await conn.execute(
        sql.SQL(
            """
            INSERT INTO {} AS s (vector_table, model, dimension) VALUES (%s, %s, %s)
            ON CONFLICT (vector_table) DO UPDATE SET model = excluded.model, dimension = excluded.dimension,
                updated_at = clock_timestamp()
            WHERE (s.model, s.dimension) IS DISTINCT FROM (excluded.model, excluded.dimension)
            """
        ).format(state_table(settings)),
        (name, model, dimension),
    )
    await conn.commit()


async def _model_of_existing_rows(
    conn: psycopg.AsyncConnection, settings: Settings, model: str
) -> str | None:
    """A table of an older version has no state row: its rows say which model wrote them."""
    cur = await conn.execute(
        sql.SQL("SELECT model FROM {} WHERE model IS NOT NULL AND model <> %s LIMIT 1").format(
            sql.Identifier(*settings.target)
        ),
        (model,),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def with_recorded_model(conn: psycopg.AsyncConnection, settings: Settings) -> Settings:
    """The settings with the identity the consumer recorded for the vector table, where only a running
    consumer learns it: an openai embedder without a declared dimension is named for the dimension the
    server answers (`openai:<host>/<model>@<dimension>`). Commands that read the table by model (audit,
    backfill, migrate) take it from here; unchanged when nothing recorded is of this embedder."""
    if settings.embedder != "openai" or settings.openai_dimensions is not None:
        return settings
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (state_table(settings).as_string(conn),))
    exists = await cur.fetchone()
    row = None
    if exists and exists[0]:
        cur = await conn.execute(
            sql.SQL("SELECT model, dimension FROM {} WHERE vector_table = %s").format(state_table(settings)),
            (target_name(settings),),
        )
        row = await cur.fetchone()
    if row is None or row[0] != identity(settings.openai_spec(), int(row[1])):
        return settings
    return Settings.model_validate({**settings.model_dump(), "model": row[0]})
