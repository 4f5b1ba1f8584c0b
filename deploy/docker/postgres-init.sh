#!/bin/sh
# Run once by the postgres image's entrypoint (/docker-entrypoint-initdb.d) on an empty data directory:
# the demo tables, then the least-privilege roles with passwords from the container's environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f /cdc/sql/schema.sql
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v debezium_password="$DEBEZIUM_PASSWORD" \
    -v consumer_password="$CDC_EMBEDDER_DB_PASSWORD" \
    -f /cdc/sql/roles.sql
