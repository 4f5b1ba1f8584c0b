"""Prometheus metrics: one prefix, base units, no keys or offsets as labels.

What is per pipeline carries a `pipeline` label: one value per declared pipeline, so it stays bounded.

The Grafana dashboard and the alert rules under ``deploy/observability/`` query these names; the
observability tests fail if either uses a series this module does not export.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import Counter, Gauge, Histogram, Info

PREFIX = "cdc_embedder"

# Outcomes of one change event; every consumed event ends in exactly one of them.
OUTCOMES = (
    "embedded",  # a new vector was written
    "unchanged",  # the text hash matched the stored one: position advanced, no model call
    "deleted",  # the vector was removed (delete or tombstone)
    "no_text",  # the row's text is empty, NULL or whitespace: its vector was removed, the row kept
    "table_cleared",  # a TRUNCATE of the source table: every vector older than it was removed
    "superseded",  # a newer change of the same key in the batch or in the table won
    "ignored",  # tombstones: the delete before them already removed the vector
    "retried",  # sent to the retry topic
    "dead_lettered",  # sent to the dead-letter topic
)

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)

EVENTS = Counter(
    f"{PREFIX}_events", "Change events consumed, by operation and outcome.", ["pipeline", "op", "outcome"]
)
BATCHES = Counter(f"{PREFIX}_batches", "Micro-batches processed.")
BATCH_SIZE = Histogram(f"{PREFIX}_batch_size_events", "Events per micro-batch.", buckets=_SIZE_BUCKETS)
MODEL_SECONDS = Histogram(f"{PREFIX}_model_seconds", "Model time per batch.", buckets=_SECONDS_BUCKETS)
DB_SECONDS = Histogram(
    f"{PREFIX}_db_seconds",
    "Database time per batch (overlapping the model time when written in parts).",
    buckets=_SECONDS_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    f"{PREFIX}_end_to_end_seconds",
    "Source commit (Debezium source.ts_ms) to vector commit.",
    ["pipeline"],
    buckets=_SECONDS_BUCKETS,
)
CAPTURE_SECONDS = Histogram(
    f"{PREFIX}_capture_seconds",
    "Source commit to the change's Kafka record (Debezium and Connect); the rest of end to end is ours.",
    ["pipeline"],
    buckets=_SECONDS_BUCKETS,
)
TEXTS_EMBEDDED = Counter(f"{PREFIX}_texts_embedded", "Texts sent through the model.", ["pipeline"])
TEXTS_AHEAD_UNUSED = Counter(
    f"{PREFIX}_texts_embedded_ahead_unused",
    "Texts embedded ahead of their batch (CDC_EMBED_AHEAD) that it did not take: model time spent in vain.",
    ["pipeline"],
)
TOKENS_EMBEDDED = Counter(
    f"{PREFIX}_tokens_embedded", "Tokens sent through the model, after truncation.", ["pipeline"]
)
TEXTS_TRUNCATED = Counter(
    f"{PREFIX}_texts_truncated", "Texts longer than the model window, truncated.", ["pipeline"]
)
# CDC_CHUNKING=chunk (consumer/chunking.py)
CHUNKS_PER_DOCUMENT = Histogram(
    f"{PREFIX}_chunks_per_document",
    "Chunks each embedded document was cut into.",
    ["pipeline"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CHUNKED_DOCUMENTS = Counter(
    f"{PREFIX}_chunked_documents",
    "Documents longer than the window, embedded as several chunks.",
    ["pipeline"],
)
# the openai backend (consumer/embedders/openai.py): one request is one POST /embeddings
EMBED_REQUESTS = Counter(
    f"{PREFIX}_embed_requests",
    "Requests to the embedding server, by HTTP status ('error': none).",
    ["status"],
)
EMBED_REQUEST_SECONDS = Histogram(
    f"{PREFIX}_embed_request_seconds",
    "Duration of one request to the embedding server.",
    buckets=_SECONDS_BUCKETS,
)
EMBED_IN_FLIGHT = Gauge(f"{PREFIX}_embed_requests_in_flight", "Requests to the embedding server in flight.")
EMBED_RATE_LIMITED = Counter(f"{PREFIX}_embed_rate_limited", "429 answers of the embedding server.")
BACKPRESSURE_SECONDS = Counter(
    f"{PREFIX}_backpressure_seconds", "Time batches waited for the embedding server's rate limit to pass."
)
TOKENS_BILLED = Counter(f"{PREFIX}_tokens_billed", "Tokens the embedding server billed (its `usage`).")
RETRIES = Counter(f"{PREFIX}_retries", "Records sent to the retry topic.", ["pipeline", "error_class"])
DEAD_LETTERS = Counter(
    f"{PREFIX}_dead_letters", "Records sent to the dead-letter topic.", ["pipeline", "error_class"]
)
DEAD_LETTER_REFERENCES = Counter(
    f"{PREFIX}_dead_letter_references",
    "Dead letters published without their payload (its copy was too large); the headers point at it.",
)
PRODUCER_RENEWALS = Counter(
    f"{PREFIX}_producer_renewals", "Transactional producers rebuilt after they were fenced or failed."
)
MODEL_TIMEOUTS = Counter(f"{PREFIX}_model_timeouts", "Model calls that outlived CDC_MODEL_TIMEOUT_S.")
REPLAYED = Counter(f"{PREFIX}_replayed", "Dead-lettered records re-published to the source topic.")
DB_ERRORS = Counter(f"{PREFIX}_db_errors", "Failed database round trips (retried with backoff).")
CONSUMER_LAG = Gauge(
    f"{PREFIX}_consumer_lag_messages", "High-water mark minus position.", ["topic", "partition"]
)
CONSUMER_LAG_SECONDS = Gauge(
    f"{PREFIX}_consumer_lag_seconds",
    "Age of the oldest record not yet processed (0 when caught up).",
    ["topic", "partition"],
)
PAUSED_PARTITIONS = Gauge(f"{PREFIX}_paused_partitions", "Partitions paused for backpressure or backoff.")
ASSIGNED_PARTITIONS = Gauge(f"{PREFIX}_assigned_partitions", "Partitions assigned to this consumer.")
SEARCH_VIEW_SERVED_BY = Gauge(
    f"{PREFIX}_search_view_served_by",
    "1 for the pipeline whose vectors a search view reads, 0 for the others of that view.",
    ["view", "pipeline"],
)
REBALANCES = Counter(f"{PREFIX}_rebalances", "Partition assignments received.")
LAST_BATCH_TIMESTAMP = Gauge(
    f"{PREFIX}_last_batch_timestamp_seconds", "Unix time of the last committed batch."
)
LOOP_HEARTBEAT_TIMESTAMP = Gauge(
    f"{PREFIX}_event_loop_heartbeat_timestamp_seconds", "Unix time the event loop last ticked."
)
MODEL_INFO = Info(f"{PREFIX}_model", "The embedding model of each pipeline.", ["pipeline"])
BUILD_INFO = Info(f"{PREFIX}_build", "Version of cdc-embedder.")


def package_version() -> str:
    try:
        return version("cdc-embedder")
    except PackageNotFoundError:
        return "0+unknown"


def record_build_info() -> None:
    BUILD_INFO.info({"version": package_version(), "python": platform.python_version()})


def record_model_info(pipeline: str, name: str, dimension: int, dtype: str) -> None:
    MODEL_INFO.labels(pipeline=pipeline).info({"name": name, "dimension": str(dimension), "dtype": dtype})


def count_event(pipeline: str, op: str, outcome: str, n: int = 1) -> None:
    EVENTS.labels(pipeline=pipeline, op=op, outcome=outcome).inc(n)


# The audit the consumer runs every CDC_AUDIT_INTERVAL_S (consumer/ops/audit.py), per kind of drift.
DRIFT_ROWS = Gauge(
    f"{PREFIX}_drift_rows",
    "Rows drifting between source and vector table, last audit.",
    ["pipeline", "kind"],
)
AUDIT_TIMESTAMP = Gauge(
    f"{PREFIX}_audit_last_timestamp_seconds", "When the last audit finished (Unix time).", ["pipeline"]
)
AUDIT_SECONDS = Gauge(f"{PREFIX}_audit_duration_seconds", "How long the last audit took.", ["pipeline"])


def record_audit(pipeline: str, counts: dict[str, int], seconds: float, finished_at: float) -> None:
    for kind, n in counts.items():
        DRIFT_ROWS.labels(pipeline=pipeline, kind=kind).set(n)
    AUDIT_SECONDS.labels(pipeline=pipeline).set(seconds)
    AUDIT_TIMESTAMP.labels(pipeline=pipeline).set(finished_at)
