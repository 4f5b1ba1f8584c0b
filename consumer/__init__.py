"""cdc-embedder: keep pgvector embeddings in sync with Postgres through Debezium and Kafka."""
