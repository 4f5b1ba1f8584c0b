"""The vector table: created beside the user's source table, checked against the model at start.

The source table stays the user's: nothing here adds a trigger or a column to it. The vector table is
keyed by the source primary key and records, per row, the model, a hash of the embedded text and the
WAL position of the change that produced it, which is what makes writes idempotent and ordered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from consumer.errors import OperatorError
from consumer.logs import get_logger
from consumer.settings import Settings, env_name

log = get_logger("cdc_embedder.schema")
# pgvector's HNSW build options when an index was created without WITH (...)
HNSW_DEFAULTS = {"m": "16", "ef_construction": "64"}
DEMO_KEY_COLUMN = "id"  # of the example table `documents` of the README, the demo, bench and tests


class SchemaError(OperatorError):
    """The tables do not fit the configuration; the message names the setting to change."""


# Key types whose text form (`col::text`) is exactly what Debezium's JSON carries (numbers, or strings
# taken from Postgres' own output); timestamps arrive as epoch numbers and char(n) loses its padding.
KEY_TYPES = re.compile(
    r"^(smallint|integer|bigint|numeric(\(\d+(,\d+)?\))?|text|character varying(\(\d+\))?|uuid)$"
)


# Text column types whose value reads the same in Debezium's JSON and through psycopg, so that the hash
# of an event's text equals the hash of the row read back (TOAST lookups, the audit). A timestamp arrives
# as epoch microseconds, numeric as base64 bytes, jsonb as a string of other spacing: never the same.
TEXT_TYPES = re.compile(r"^(text|character varying(\(\d+\))?|citext)$")


@dataclass(frozen=True, slots=True)
class TableInfo:
    """The source table's primary key as the vector table copies it: column names and SQL types."""

    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]  # e.g. ("uuid",), ("bigint", "text")

    @property
    def keys(self) -> list[tuple[str, str]]:
        return list(zip(self.key_columns, self.key_types, strict=True))


def _ident(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


async def column_type(conn: psycopg.AsyncConnection, schema: str, table: str, column: str) -> str | None:
    cur = await conn.execute(
        """
        SELECT format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND NOT a.attisdropped AND a.attnum > 0
        """,
        (schema, table, column),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


# The primary key columns of a table (parameters: schema, name), in key order; no rows without one.
PRIMARY_KEY_SQL = """
    SELECT a.attname FROM pg_index i
    JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND i.indisprimary
    ORDER BY k.n
"""


async def primary_key(conn: psycopg.AsyncConnection, schema: str, table: str) -> list[str]:
    cur = await conn.execute(PRIMARY_KEY_SQL, (schema, table))
    return [str(row[0]) for row in await cur.fetchall()]


async def source_key(conn: psycopg.AsyncConnection, settings: Settings) -> TableInfo:
    """The key the vector table copies: the configured columns, else the source's primary key."""
    schema, table = settings.source
    columns = settings.key_column_list or tuple(await primary_key(conn, schema, table))
    if not columns:
        raise SchemaError(
            f"source table {settings.source_table} has no primary key (or does not exist): set "
            f"{env_name('source_table')}, or {env_name('key_columns')} to Debezium's message key columns"
        )
    types = []
    for column in columns:
        key_type = await column_type(conn, schema, table, column)
        if key_type is None:
            raise SchemaError(
                f"source table {settings.source_table} has no column {column!r}: "
                f"set {env_name('key_columns')}"
            )
        if not KEY_TYPES.match(key_type):
            raise SchemaError(
                f"key column {settings.source_table}.{column} is {key_type}; keys must be integers, numeric, "
                f"text, varchar or uuid: set {env_name('key_columns')} to such a unique column"
            )
        types.append(key_type)
    return TableInfo(tuple(columns), tuple(types))


async def hnsw_options(conn: psycopg.AsyncConnection, schema: str, table: str) -> list[dict[str, str]]:
    """Build options of each HNSW index on the table (pgvector's defaults filled in)."""
    cur = await conn.execute(
        """
        SELECT c.reloptions FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND am.amname = 'hnsw'
        """,
        (schema, table),
    )
    return [
        HNSW_DEFAULTS | dict(option.split("=", 1) for option in (row[0] or []))
        for row in await cur.fetchall()
    ]


async def _check_index_options(conn: psycopg.AsyncConnection, settings: Settings) -> None:
    """An existing index keeps the options it was built with: say so when the settings ask for others."""
    wanted = {"m": str(settings.hnsw_m), "ef_construction": str(settings.hnsw_ef_construction)}
    for options in await hnsw_options(conn, *settings.target):
        differing = {k: v for k, v in wanted.items() if options.get(k) != v}
        if differing:
            log.warning(
                "the vector table's HNSW index was built with other options; they apply to a new index only",
                index_options={k: options.get(k) for k in differing},
                settings={env_name(f"hnsw_{k}"): v for k, v in differing.items()},
                fix="CREATE INDEX CONCURRENTLY ... WITH (m = ..., ef_construction = ...), drop the old one",
            )


async def ensure_vector_table(
    conn: psycopg.AsyncConnection,
    settings: Settings,
    dimension: int,
    source: psycopg.AsyncConnection | None = None,
) -> TableInfo:
    """Create the vector table if missing; fail if the source or an existing vector table does not fit.

    `conn` is of the vector database, `source` of the source database where that is another one.
    """
    schema, table = settings.source
    source = source or conn
    info = await source_key(source, settings)
    for column in settings.text_column_list:
        kind = await column_type(source, schema, table, column)
        if kind is None:
            raise SchemaError(
                f"source table {settings.source_table} has no column {column!r}: "
                f"set {env_name('text_columns')}"
            )
        if not TEXT_TYPES.match(kind):
            raise SchemaError(
                f"column {column!r} of {settings.source_table} is {kind}, whose value Debezium sends in "
                "another form than the table holds (so an unchanged row would look changed): embed text, "
                f"varchar or citext columns only; set {env_name('text_columns')} (or the pipeline's "
                "text_template) without it, or keep a text copy of it in the table"
            )
    vschema, vtable = settings.target
    existing = await column_type(conn, vschema, vtable, "embedding")
    if existing is not None:
        await _check_existing(conn, settings, info, existing, dimension)
        return info
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {table} (
                {keys},
                embedding vector({dimension}),
                model text,
                text_sha256 bytea,
                source_lsn bigint NOT NULL,
                source_ts timestamptz,
                deleted boolean NOT NULL DEFAULT false,
                snapshot boolean NOT NULL DEFAULT false,
                updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                PRIMARY KEY ({key_names})
            )
            """
        ).format(
            table=_ident(vschema, vtable),
            keys=sql.SQL(", ").join(
                sql.SQL("{} {} NOT NULL").format(sql.Identifier(c), sql.SQL(t)) for c, t in info.keys
            ),
            key_names=sql.SQL(", ").join(map(sql.Identifier, info.key_columns)),
            dimension=sql.Literal(dimension),
        )
    )
    await conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {m}, ef_construction = {ef})"
        ).format(
            name=sql.Identifier(f"{vtable}_embedding_hnsw"),
            table=_ident(vschema, vtable),
            m=sql.Literal(settings.hnsw_m),
            ef=sql.Literal(settings.hnsw_ef_construction),
        )
    )
    await conn.commit()
    return info


async def _check_existing(
    conn: psycopg.AsyncConnection, settings: Settings, info: TableInfo, embedding: str, dimension: int
) -> None:
    """An existing vector table must fit the model and the source key.

    No DDL here but one column that tables of older versions lack: the consumer's role may (and
    should) lack CREATE on the schema.
    """
    vschema, vtable = settings.target
    if embedding != f"vector({dimension})":
        model_setting = (
            f"{env_name('openai_model')} (or {env_name('openai_dimensions')})"
            if settings.embedder == "openai"
            else env_name("model")
        )
        raise SchemaError(
            f"{settings.vector_table}.embedding is {embedding} but the embedder gives vector({dimension}): "
            f"set {env_name('vector_table')} to a new table, or {model_setting} to a model of that dimension"
        )
    vector_key = await primary_key(conn, vschema, vtable)
    vector_types = [await column_type(conn, vschema, vtable, c) for c in vector_key]
    if (tuple(vector_key), tuple(vector_types)) != (info.key_columns, info.key_types):
        raise SchemaError(
            f"{settings.vector_table} is keyed by {list(zip(vector_key, vector_types, strict=True))} but "
            f"{settings.source_table} by {info.keys}: set {env_name('vector_table')} to a new table"
        )
    if await column_type(conn, vschema, vtable, "snapshot") is None:
        add = sql.SQL("ALTER TABLE {} ADD COLUMN snapshot boolean NOT NULL DEFAULT false").format(
            _ident(vschema, vtable)
        )
        try:
            await conn.execute(add)
            await conn.commit()
        except psycopg.errors.InsufficientPrivilege:
            await conn.rollback()
            raise SchemaError(
                f"{settings.vector_table} predates the snapshot column; as its owner run: "
                f"{add.as_string(conn)}"
            ) from None
    await _check_index_options(conn, settings)


async def create_demo_source_table(
    conn: psycopg.AsyncConnection, settings: Settings, publication: str, signal_table: str | None = None
) -> None:
    """The example source table of the README and the tests, `documents(id, title, body, ...)`, and the
    publication Debezium reads it through (the connector does not create publications: that would need
    ownership of the table), with Debezium's signal table in it if one is named."""
    schema, table = settings.source
    tables = [_ident(schema, table)]
    if signal_table is not None:
        tables.append(sql.Identifier(*signal_table.split(".")))
        # Debezium's layout of a signal table; an incremental snapshot writes its watermarks here too
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, "
                "data varchar(2048))"
            ).format(tables[-1])
        )
    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    await conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {table} (
                {key} bigint PRIMARY KEY,
                title text,
                body text,
                tags text[],
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(table=_ident(schema, table), key=sql.Identifier(DEMO_KEY_COLUMN))
    )
    cur = await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
    if await cur.fetchone() is None:
        await conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(tables)
            )
        )
    else:
        await add_to_publication(conn, publication, tables)
    await conn.commit()


async def add_to_publication(
    conn: psycopg.AsyncConnection, publication: str, tables: list[sql.Identifier]
) -> list[sql.Identifier]:
    """Add the tables the publication lacks (as the tables' owner); return those added."""
    added = []
    for table in tables:
        cur = await conn.execute(
            "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
            "WHERE p.pubname = %s AND r.prrelid = to_regclass(%s)",
            (publication, table.as_string(conn)),
        )
        if await cur.fetchone() is None:
            await conn.execute(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), table)
            )
            added.append(table)
    return added


async def ensure_publication(conn: psycopg.AsyncConnection, publication: str, tables: list[str]) -> list[str]:
    """Add the declared tables the publication lacks; return those added.

    Adding needs ownership of the table, which the consumer's role often lacks: then the error names the
    statement for the owner to run, instead of a connector that silently captures nothing of a table.
    """
    cur = await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
    idents = [_ident(*table.split(".", 1)) for table in tables]
    listed = sql.SQL(", ").join(idents).as_string(conn)
    if await cur.fetchone() is None:
        raise SchemaError(
            f"no publication {publication} (publication.name of the connector file): as the tables' owner, "
            f"run CREATE PUBLICATION {publication} FOR TABLE {listed}"
        )
    try:
        added = await add_to_publication(conn, publication, idents)
        await conn.commit()
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable) as exc:
        await conn.rollback()
        raise SchemaError(
            f"publication {publication} lacks some of {listed} and this role cannot add them "
            f"({exc.sqlstate}: {str(exc).strip()}): create the tables, or as their owner run "
            f"ALTER PUBLICATION {publication} ADD TABLE <each one missing>"
        ) from None
    return [table for table, ident in zip(tables, idents, strict=True) if ident in added]
