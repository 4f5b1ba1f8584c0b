"""The chunk table of a chunked pipeline (CDC_CHUNKING=chunk): one row per chunk of a document.

`<vector table>_chunks` holds the key, the chunk's index, its text and its vector; the vector table keeps
each document's state (position, text hash, model, tombstone) and its document vector, so the guard and
the unchanged-text shortcut work per document as in truncate mode. The sink replaces a document's
chunks in the transaction that writes its state (`ChunkStatements`): a search sees all of the old chunks
or all of the new ones. A foreign key with ON DELETE CASCADE takes a document's chunks with its state
row, which is how a TRUNCATE of the source empties both. Search needs no source table: the chunk has its
text.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from consumer.key_sql import key_aliases, key_casts, key_match, key_names, unnest_keys
from consumer.schema import SchemaError, TableInfo, column_type
from consumer.settings import Settings, env_name


def _switch_hint() -> str:
    return (
        f"set {env_name('vector_table')} to a new table and fill it (`cdc-embedder backfill`), then switch "
        "searches to it (`cdc-embedder migrate`)"
    )


async def ensure_chunk_table(
    conn: psycopg.AsyncConnection, settings: Settings, info: TableInfo, dimension: int
) -> None:
    """Create the chunk table of a chunked pipeline; refuse a vector table written in the other mode.

    Document vectors of truncated texts and of chunked ones are not the same thing, so a table keeps
    the mode it was filled in.
    """
    vschema, vtable = settings.target
    cschema, ctable = settings.chunk_target
    has_chunks = await column_type(conn, cschema, ctable, "embedding") is not None
    if settings.chunking != "chunk":
        if has_chunks:
            raise SchemaError(
                f"{settings.vector_table} was filled with CDC_CHUNKING=chunk ({cschema}.{ctable} exists): "
                f"set {env_name('chunking')}=chunk, or {_switch_hint()}"
            )
        return
    if has_chunks:
        return
    cur = await conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE embedding IS NOT NULL)").format(
            sql.Identifier(vschema, vtable)
        )
    )
    row = await cur.fetchone()
    if row is not None and row[0]:
        raise SchemaError(
            f"{settings.vector_table} holds vectors of whole texts (CDC_CHUNKING=truncate); chunking "
            f"needs a table of its own: {_switch_hint()}, or set {env_name('chunking')}=truncate"
        )
    chunks = sql.Identifier(cschema, ctable)
    create = sql.SQL(
        """
            CREATE TABLE IF NOT EXISTS {chunks} (
                {keys},
                chunk_index integer NOT NULL,
                chunk_text text NOT NULL,
                embedding vector({dimension}) NOT NULL,
                PRIMARY KEY ({names}, chunk_index),
                FOREIGN KEY ({names}) REFERENCES {vt} ({names}) ON DELETE CASCADE
            )
        """
    ).format(
        chunks=chunks,
        keys=sql.SQL(", ").join(
            sql.SQL("{} {} NOT NULL").format(sql.Identifier(c), sql.SQL(t)) for c, t in info.keys
        ),
        dimension=sql.Literal(dimension),
        names=key_names(info),
        vt=sql.Identifier(vschema, vtable),
    )
    index = sql.SQL(
        "CREATE INDEX IF NOT EXISTS {name} ON {chunks} USING hnsw (embedding vector_cosine_ops) "
        "WITH (m = {m}, ef_construction = {ef})"
    ).format(
        name=sql.Identifier(f"{ctable}_embedding_hnsw"),
        chunks=chunks,
        m=sql.Literal(settings.hnsw_m),
        ef=sql.Literal(settings.hnsw_ef_construction),
    )
    try:
        await conn.execute(create)
        await conn.execute(index)
        await conn.commit()
    except psycopg.errors.InsufficientPrivilege:
        await conn.rollback()
        statements = "; ".join(" ".join(s.as_string(conn).split()) for s in (create, index))
        raise SchemaError(
            f"this role may not create the chunk table of {settings.vector_table}: as the schema's owner "
            f"run {statements}; and grant SELECT, INSERT, UPDATE, DELETE on it to the consumer's role"
        ) from None


class ChunkStatements:
    """Replacing the chunks of some documents: delete them all, insert the new ones (parameters: the
    keys `d0`, `d1`, ... of the documents; the chunks' keys `c0`, ..., `indexes`, `texts`, `vectors`)."""

    def __init__(self, settings: Settings, info: TableInfo) -> None:
        chunks = sql.Identifier(*settings.chunk_target)
        n = len(info.key_columns)
        self.delete = sql.SQL(
            "DELETE FROM {chunks} c USING unnest({unnest}) AS u({aliases}) WHERE {match}"
        ).format(
            chunks=chunks, unnest=unnest_keys("d", n), aliases=key_aliases(n), match=key_match("c", info)
        )
        self.insert = sql.SQL(
            """
            INSERT INTO {chunks} ({names}, chunk_index, chunk_text, embedding)
            SELECT {casts}, u.chunk_index, u.chunk_text, u.embedding
            FROM unnest({unnest}, %(indexes)s::integer[], %(texts)s::text[], %(vectors)s::vector[])
                AS u({aliases}, chunk_index, chunk_text, embedding)
            """
        ).format(
            chunks=chunks,
            names=key_names(info),
            casts=key_casts(info),
            unnest=unnest_keys("c", n),
            aliases=key_aliases(n),
        )
