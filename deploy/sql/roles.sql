-- Least-privilege roles for cdc-embedder. Run as a superuser (or a role with CREATEROLE that owns the
-- tables and may grant REPLICATION), after schema.sql. Passwords come from psql variables, never from
-- this file:
--   psql -v ON_ERROR_STOP=1 \
--        -v debezium_password="$DEBEZIUM_PASSWORD" \
--        -v consumer_password="$CDC_EMBEDDER_DB_PASSWORD" \
--        -f deploy/sql/roles.sql
-- Safe to re-run: roles are created once, passwords and grants are (re)applied every time.
-- Vectors in a database of their own (CDC_VECTOR_DATABASE_URL): run it in each database with the part
-- schema.sql created there (-v part=source, -v part=vectors). In the source database the consumer then
-- only reads (TOAST text) and writes backfill signals; in the vector database Debezium has nothing.

\set ON_ERROR_STOP on

\if :{?part}
\else
    \set part both
\endif
SELECT :'part' IN ('source', 'both') AS source_part, :'part' IN ('vectors', 'both') AS vectors_part \gset

\if :source_part
\if :{?debezium_password}
\else
    DO $$ BEGIN RAISE EXCEPTION 'pass the replication role password: psql -v debezium_password=...'; END $$;
\endif
\endif
\if :{?consumer_password}
\else
    DO $$ BEGIN RAISE EXCEPTION 'pass the consumer role password: psql -v consumer_password=...'; END $$;
\endif

SELECT current_database() AS dbname \gset

-- Nobody creates objects in public but its owner (already the default from PostgreSQL 15 on).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

\if :source_part
-- --- debezium: the replication role the Debezium Postgres connector (pgoutput) logs in as ----------
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'debezium') AS create_debezium \gset
\if :create_debezium
    CREATE ROLE debezium;
\endif
ALTER ROLE debezium WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
    PASSWORD :'debezium_password';
GRANT CONNECT ON DATABASE :"dbname" TO debezium;
GRANT USAGE ON SCHEMA public TO debezium;
-- The initial snapshot reads the table; streaming needs only REPLICATION and the publication.
GRANT SELECT ON public.documents TO debezium;
-- Incremental snapshots (backfills) read signals and write their window watermarks to the signal table.
GRANT SELECT, INSERT, UPDATE, DELETE ON public.cdc_embedder_signal TO debezium;

-- The publication is created here, by the table's owner, because creating one FOR TABLE needs
-- ownership of the table. The connector must use it (publication.name=cdc_embedder) and not create
-- its own: with publication.autocreate.mode=disabled it only reads it; with =filtered it would
-- CREATE (or ALTER ... SET TABLE) a publication itself, which needs ownership of public.documents,
-- more than a replication role should have. Adding a table later: ALTER PUBLICATION here, as owner.
SELECT NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'cdc_embedder') AS create_publication \gset
\if :create_publication
    CREATE PUBLICATION cdc_embedder FOR TABLE public.documents, public.cdc_embedder_signal;
\endif
SELECT NOT EXISTS (
    SELECT FROM pg_publication_tables WHERE pubname = 'cdc_embedder' AND tablename = 'cdc_embedder_signal'
) AS add_signal \gset
\if :add_signal
    ALTER PUBLICATION cdc_embedder ADD TABLE public.cdc_embedder_signal;
\endif
\endif

-- --- cdc_embedder: the consumer, writes only the vectors table ---------------------------------------
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_embedder') AS create_consumer \gset
\if :create_consumer
    CREATE ROLE cdc_embedder;
\endif
ALTER ROLE cdc_embedder WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'consumer_password';
GRANT CONNECT ON DATABASE :"dbname" TO cdc_embedder;
GRANT USAGE ON SCHEMA public TO cdc_embedder;
\if :vectors_part
GRANT SELECT, INSERT, UPDATE, DELETE ON public.document_embeddings TO cdc_embedder;
-- Its vector tables' state (model, truncate position).
GRANT SELECT, INSERT, UPDATE ON public.cdc_embedder_targets TO cdc_embedder;
\endif
\if :source_part
-- `cdc-embedder backfill` and `audit --repair` write signals.
GRANT INSERT ON public.cdc_embedder_signal TO cdc_embedder;
-- Read-only on the source: the text of columns a change left unchanged in TOAST is read from here.
GRANT SELECT ON public.documents TO cdc_embedder;
\endif
