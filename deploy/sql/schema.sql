-- Tables for the demo (docker compose) and a starting point for production.
-- Run as the owner of the schema (in compose: the postgres superuser, at init), before roles.sql:
--   psql -v ON_ERROR_STOP=1 -f deploy/sql/schema.sql
-- The vector column's dimension is the model's: 384 for thenlper/gte-small (the default CDC_MODEL).
-- Vectors in a database of their own (CDC_VECTOR_DATABASE_URL): run it in each database with its part,
--   psql -v part=source -f ...   (the source tables)   and   psql -v part=vectors -f ...   (the vectors)
-- Without `part`, both go into this database.

\if :{?part}
\else
    \set part both
\endif
SELECT :'part' IN ('source', 'both') AS source_part, :'part' IN ('vectors', 'both') AS vectors_part \gset
SELECT :'part' NOT IN ('source', 'vectors', 'both') AS bad_part \gset
\if :bad_part
    DO $$ BEGIN RAISE EXCEPTION 'part must be source, vectors or both'; END $$;
\endif

\if :source_part
-- The source table Debezium captures. Its primary key is the replica identity, so delete events carry
-- the key; columns that a change left untouched in TOAST arrive as Debezium's placeholder, and the
-- consumer reads their current value from this table (hence its SELECT grant in roles.sql).
CREATE TABLE IF NOT EXISTS public.documents (
    id         bigint PRIMARY KEY,
    title      text,
    body       text,
    updated_at timestamptz DEFAULT now()
);

-- Debezium's signal table (connector setting signal.data.collection): a row asks for a snapshot of some
-- rows (`cdc-embedder backfill`), and incremental snapshots write their watermarks here. It must be in
-- the publication (roles.sql).
CREATE TABLE IF NOT EXISTS public.cdc_embedder_signal (
    id   varchar(42) PRIMARY KEY,
    type varchar(32) NOT NULL,
    data varchar(2048)
);
\endif

\if :vectors_part
CREATE EXTENSION IF NOT EXISTS vector;

-- The vectors, one row per source row, written only by the consumer (role cdc_embedder). The same
-- definition as consumer/schema.py's ensure_vector_table (a test compares them): created here, by the
-- schema's owner, because the consumer's role may not create tables. The key is the source's primary
-- key, column for column (several columns for a composite key).
CREATE TABLE IF NOT EXISTS public.document_embeddings (
    id          bigint NOT NULL,             -- public.documents.id
    embedding   vector(384),                 -- NULL: deleted, or the row has no text to embed
    model       text,
    text_sha256 bytea,                       -- hash of the embedded text: unchanged text skips the model
    source_lsn  bigint NOT NULL,             -- WAL position of the change that produced this row
    source_ts   timestamptz,
    deleted     boolean NOT NULL DEFAULT false,
    snapshot    boolean NOT NULL DEFAULT false, -- written by a snapshot row, which any streamed change beats
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (id)
);

-- One row per vector table: the model that wrote it (checked at start) and the position of the source's
-- last TRUNCATE, below which no change writes any more. consumer/targets.py creates the same.
CREATE TABLE IF NOT EXISTS public.cdc_embedder_targets (
    vector_table  text PRIMARY KEY,
    model         text NOT NULL,
    dimension     integer NOT NULL,
    truncated_lsn bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- m and ef_construction are pgvector's defaults and CDC_HNSW_M, CDC_HNSW_EF_CONSTRUCTION's: lower values
-- make each vector write cheaper for the database and search recall lower (README, "Benchmarks").
CREATE INDEX IF NOT EXISTS document_embeddings_embedding_hnsw
    ON public.document_embeddings USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
\endif
