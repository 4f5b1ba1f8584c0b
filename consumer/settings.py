"""All configuration, read once from environment variables (prefix ``CDC_``).

Kubernetes injects configuration as environment variables, so that is the only source. Every field is
documented in the README with its default; a missing or malformed value fails at start and names the
variable to change.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer import conninfo

if TYPE_CHECKING:
    from consumer.embedders.openai import OpenAIEmbedderSpec

ENV_PREFIX = "CDC_"
DEFAULT_MODEL = "thenlper/gte-small"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the environment variable."""


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _split_qualified(name: str) -> tuple[str, str]:
    schema, _, table = name.rpartition(".")
    return (schema or "public", table)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", env_ignore_empty=True
    )

    # --- Postgres -------------------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="Postgres URL or key=value conninfo of the source and vector tables. Unset: local stack.",
    )
    vector_database_url: str | None = Field(
        default=None,
        description="Postgres of the vector tables, apart from the source's; unset: CDC_DATABASE_URL's.",
    )
    database_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    database_pool_size: int = Field(default=4, ge=1)
    # A query that outlives this fails (and is retried like an outage) instead of holding its batch.
    database_statement_timeout_ms: int = Field(
        default=30_000, ge=0, description="statement_timeout of the consumer's sessions; 0: the server's."
    )

    # --- Pipelines -------------------------------------------------------------------------------
    pipelines_file: Path | None = Field(
        default=None, description="YAML file declaring the pipelines. Unset: one, from the variables below."
    )
    pipeline_name: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Name of the default pipeline (metric label). Unset: the source table's.",
    )
    search_view: str | None = Field(
        default=None, description="The view searches read (cdc-embedder migrate). Unset: none."
    )

    # --- Source and target tables (the default pipeline) ----------------------------------------
    source_table: str = "public.documents"
    key_columns: str | None = Field(
        default=None, description="Comma-separated primary key columns. Unset: the source's primary key."
    )
    key_column: str | None = Field(default=None, description="One key column (older name of key_columns).")
    text_columns: str = Field(default="title,body", description="Comma-separated columns joined to the text.")
    text_template: str | None = Field(
        default=None, description='Text made by a template instead, e.g. "{title}\\n\\n{body}".'
    )
    vector_table: str = "public.document_embeddings"
    # pgvector's defaults. Each new row costs the database an HNSW insert, so lower values write faster
    # and recall less (README: measured on the corpus); they apply when the vector table is created.
    hnsw_m: int = Field(default=16, ge=2, le=100, description="HNSW links per node (vector table creation).")
    hnsw_ef_construction: int = Field(
        default=64, ge=4, le=1000, description="HNSW candidate list while building (vector table creation)."
    )

    # --- Kafka ----------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="host:port list. Unset: the embedded local stack."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Kafka's 500 ms default delayed rows by up to that: a fetch request holds no partition whose records
    # still wait in the consumer's buffer, so the broker can park it for the full wait while those
    # partitions fill up (p99 freshness at half load 1.3 s against 0.5 s with 50 ms).
    kafka_fetch_max_wait_ms: int = Field(
        default=50,
        ge=1,
        description="How long the broker may hold a fetch for new records (fetch.max.wait.ms).",
    )
    topic_prefix: str = Field(default="cdc", description="Debezium topic.prefix.")
    consumer_group: str = "cdc-embedder"
    connect_url: str | None = Field(default=None, description="Kafka Connect REST URL. Unset: local stack.")

    # --- Model ----------------------------------------------------------------------------------
    model: str = Field(default=DEFAULT_MODEL, description="sentence-transformers model id or local folder.")
    max_seq_length: int = Field(default=512, ge=8)
    torch_threads: int = Field(default=0, ge=0, description="0: one per core.")
    embed_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 where the CPU computes it natively, else float32."
    )
    embed_token_budget: int = Field(
        default=1024, ge=0, description="Padded tokens per forward pass (length-sorted); 0: one batch."
    )
    embed_runtime: Literal["auto", "torch", "openvino"] = Field(
        default="auto",
        description="What runs the local model: OpenVINO (an exported IR) or torch; auto: OpenVINO where "
        "the model can be exported (a transformer with mean pooling), else torch.",
    )
    embed_quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: OpenVINO's static int8 model (`cdc-embedder openvino-export`); another identity.",
    )
    openvino_cache_dir: Path = Field(
        default=Path("~/.cache/cdc-embedder/openvino"),
        description="Exported OpenVINO models, one folder per model and quantization.",
    )
    max_text_chars: int = Field(
        default=200_000,
        ge=1,
        description="Longer texts are not embedded: the row's vectors are removed (chunking's memory bound).",
    )
    chunking: Literal["truncate", "chunk"] = Field(
        default="truncate",
        description="truncate: one vector of a text's first max_seq_length tokens; chunk: one per "
        "window-sized chunk, in <vector table>_chunks.",
    )
    chunk_overlap_tokens: int = Field(
        default=32, ge=0, description="Tokens a chunk may share with the one before it (CDC_CHUNKING=chunk)."
    )
    model_timeout_s: float = Field(
        default=300.0, gt=0, description="A model call taking longer fails its batch (retried) and liveness."
    )
    on_model_change: Literal["refuse", "reembed"] = Field(
        default="refuse",
        description="A vector table of another model: refuse to start, or re-embed rows as they change.",
    )

    # --- Embedding backend: `local` (the model settings above) or an OpenAI-compatible server ---------
    embedder: Literal["local", "openai"] = Field(
        default="local", description="local: sentence-transformers here; openai: an OpenAI-compatible API."
    )
    # Defaults of the openai backend are those of OpenAIEmbedderSpec (consumer/embedders/openai.py).
    openai_model: str | None = Field(
        default=None, description="Model the server serves (CDC_EMBEDDER=openai)."
    )
    openai_base_url: str | None = Field(default=None, description="API root. Unset: OpenAI's.")
    openai_dimensions: int | None = Field(default=None, ge=1, description="Sent as `dimensions`.")
    openai_api_key: SecretStr | None = Field(
        default=None, description="Bearer token (a Secret); never logged."
    )
    openai_api_key_file: Path | None = Field(
        default=None, description="File holding the key, re-read per call."
    )
    openai_concurrency: int | None = Field(default=None, ge=1, description="Requests in flight.")
    openai_max_inputs_per_request: int | None = Field(default=None, ge=1)
    openai_max_tokens_per_request: int | None = Field(default=None, ge=1)
    openai_max_tokens_per_input: int | None = Field(default=None, ge=1)
    openai_request_timeout_s: float | None = Field(default=None, gt=0)
    openai_encoding_format: Literal["float", "base64"] | None = None
    openai_price_per_million_tokens: float | None = Field(
        default=None, ge=0, description="USD per million tokens, for backfill --dry-run's cost."
    )

    # --- Batching -------------------------------------------------------------------------------
    batch_max_events: int = Field(default=256, ge=1)
    batch_max_wait_ms: int = Field(default=10, ge=0, description="Linger for more after a batch's 1st event.")
    batch_write_parts: int = Field(default=1, ge=1, description="Writes per batch, each beside the model.")
    # Bounds a batch's model time with long rows (chunking: 1 MiB ~ 250,000 tokens) within Kafka's
    # max.poll.interval.ms and CDC_MODEL_TIMEOUT_S (300 s each): a batch outliving them would repeat.
    batch_max_bytes: int = Field(default=1 << 20, ge=1, description="Bytes of records a batch takes.")
    # The model idled through a batch's vector write and Kafka transaction (a quarter of the soak's time).
    embed_ahead: bool = Field(default=True, description="Embed the next batch while one writes and commits.")

    # --- Retry and dead letters -----------------------------------------------------------------
    retry_max_attempts: int = Field(default=5, ge=1, description="Attempts before dead-lettering.")
    retry_backoff_initial_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: float = Field(default=300.0, gt=0)
    db_retry_backoff_max_s: float = Field(default=10.0, gt=0)
    # The consumer creates the retry and dead-letter topics when they are missing (consumer/topics.py).
    topic_partitions: int | None = Field(
        default=None, ge=1, description="Partitions of new retry/dead-letter topics. Unset: the source's."
    )
    topic_replication_factor: int | None = Field(
        default=None, ge=1, description="Replicas of new retry/dead-letter topics. Unset: min(3, brokers)."
    )
    topic_min_insync_replicas: int | None = Field(
        default=None, ge=1, description="Their min.insync.replicas. Unset: replicas - 1, at least 1."
    )

    # --- Operations -----------------------------------------------------------------------------
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9400, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_grace_s: float = Field(default=20.0, gt=0)
    liveness_stall_s: float = Field(default=30.0, gt=0)

    # --- Audit (consumer/ops/audit.py) -----------------------------------------------------------
    audit_interval_s: float = Field(
        default=3600.0, ge=0, description="The consumer audits the vector table this often; 0: never."
    )
    audit_settle_s: float = Field(
        default=10.0, ge=0, description="Drifting keys are read again after this long (changes in flight)."
    )
    audit_range_rows: int = Field(default=2000, ge=1, description="Source keys read per range.")

    # --- Embedded local stack (`cdc-embedder stack`) --------------------------------------------
    stack_dir: Path = Path(".stack")
    stack_pg_port: int = 54329
    stack_vector_database: bool = Field(
        default=False, description="The local stack starts a second Postgres for the vector tables."
    )
    stack_vector_pg_port: int = 54339
    stack_kafka_port: int = 19092
    stack_kafka_controller_port: int = 19093
    stack_connect_port: int = 18083
    stack_topic_partitions: int = Field(default=3, ge=1)

    @field_validator("database_url", "vector_database_url")
    @classmethod
    def _conninfo(cls, value: str | None) -> str | None:
        if value is not None:
            conninfo.check(value)
        return value

    @field_validator("source_table", "vector_table", "search_view")
    @classmethod
    def _qualified_identifier(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not all(_IDENTIFIER.match(part) for part in value.split(".")) or value.count(".") > 1:
            raise ValueError(f"{value!r} is not a table name like schema.table")
        return value

    @field_validator("key_column")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a column name")
        return value

    @field_validator("text_columns", "key_columns")
    @classmethod
    def _identifiers(cls, value: str | None) -> str | None:
        if value is None:
            return None
        columns = [c.strip() for c in value.split(",") if c.strip()]
        if not columns or not all(_IDENTIFIER.match(c) for c in columns):
            raise ValueError(f"{value!r} is not a comma-separated list of column names")
        return ",".join(columns)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"{env_name('kafka_security_protocol')}={self.kafka_security_protocol} needs "
                f"{env_name('kafka_sasl_mechanism')}, {env_name('kafka_sasl_username')} and "
                f"{env_name('kafka_sasl_password')}"
            )
        if self.hnsw_ef_construction < 2 * self.hnsw_m:
            # pgvector refuses the index otherwise; say so at start, not at the first CREATE INDEX
            raise ValueError(
                f"{env_name('hnsw_ef_construction')} must be at least twice {env_name('hnsw_m')}"
            )
        if self.chunking == "chunk" and self.embedder == "openai":
            # chunks are cut by the model's own tokenizer, which an API does not hand out
            raise ValueError(
                f"{env_name('chunking')}=chunk needs the model's tokenizer: use "
                f"{env_name('embedder')}=local, or {env_name('chunking')}=truncate"
            )
        if self.chunking == "chunk" and self.chunk_overlap_tokens >= self.max_seq_length // 2:
            raise ValueError(
                f"{env_name('chunk_overlap_tokens')} must be under half of {env_name('max_seq_length')}"
            )
        if self.key_columns and self.key_column and self.key_columns != self.key_column:
            raise ValueError(f"set {env_name('key_columns')} or {env_name('key_column')}, not both")
        isr, replicas = self.topic_min_insync_replicas, self.topic_replication_factor
        if isr is not None and replicas is not None and isr > replicas:
            raise ValueError(
                f"{env_name('topic_min_insync_replicas')} must not exceed "
                f"{env_name('topic_replication_factor')}: no write could succeed"
            )
        if self.embed_quantization != "none" and self.embed_runtime != "openvino":
            raise ValueError(
                f"{env_name('embed_quantization')}={self.embed_quantization} needs "
                f"{env_name('embed_runtime')}=openvino"
            )
        if self.retry_backoff_initial_s > self.retry_backoff_max_s:
            raise ValueError(
                f"{env_name('retry_backoff_initial_s')} must not exceed {env_name('retry_backoff_max_s')}"
            )
        return self

    @classmethod
    def from_env_map(cls, env: dict[str, str]) -> Settings:
        """Settings from a map of CDC_* variables alone (not this process's environment)."""
        return cls.model_validate(
            {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        )

    def openai_spec(self) -> OpenAIEmbedderSpec:
        """The openai backend of today's single pipeline, from the CDC_OPENAI_* variables."""
        from consumer.embedders.openai import OpenAIEmbedderSpec

        prefix = "openai_"
        given = {
            name.removeprefix(prefix): getattr(self, name)
            for name in type(self).model_fields
            if name.startswith(prefix) and getattr(self, name) is not None
        }
        try:
            return OpenAIEmbedderSpec.model_validate(given)
        except ValidationError as exc:
            problems = [
                f"{env_name(prefix + str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']}"
                for e in exc.errors()
            ]
            raise SettingsError(
                f"invalid {env_name('embedder')}=openai configuration: " + "; ".join(problems)
            ) from None

    # --- Derived values -------------------------------------------------------------------------
    @property
    def model_identity(self) -> str:
        """The `model` column and text-hash prefix of this embedder's vectors: int8 arithmetic gives other
        vectors than the model's own, so they are re-embedded (CDC_ON_MODEL_CHANGE) rather than mixed."""
        if self.embedder == "local" and self.embed_quantization == "int8":
            return f"{self.model}+int8"
        return self.model

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def uses_embedded_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @cached_property
    def dsn(self) -> str:
        """The source database: the source tables, Debezium's publication and signal table."""
        return conninfo.with_sslmode(
            self.database_url or f"postgresql://cdc:cdc@127.0.0.1:{self.stack_pg_port}/cdc",
            self.database_sslmode,
        )

    @cached_property
    def vector_dsn(self) -> str:
        """The database of the vector tables: the source's, unless one of its own is set."""
        if self.vector_database_url:
            return conninfo.with_sslmode(self.vector_database_url, self.database_sslmode)
        if self.stack_vector_database and self.uses_embedded_postgres:
            return f"postgresql://cdc:cdc@127.0.0.1:{self.stack_vector_pg_port}/cdc"
        return self.dsn

    @property
    def separate_vector_database(self) -> bool:
        return self.vector_dsn != self.dsn

    @cached_property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.stack_kafka_port}"

    @cached_property
    def connect_rest_url(self) -> str:
        return (self.connect_url or f"http://127.0.0.1:{self.stack_connect_port}").rstrip("/")

    @cached_property
    def source(self) -> tuple[str, str]:
        return _split_qualified(self.source_table)

    @cached_property
    def target(self) -> tuple[str, str]:
        return _split_qualified(self.vector_table)

    @cached_property
    def chunk_target(self) -> tuple[str, str]:
        """The chunk table of CDC_CHUNKING=chunk, beside the vector table (each document's state)."""
        schema, table = self.target
        return schema, f"{table}_chunks"

    @cached_property
    def pipeline(self) -> str:
        """This pipeline's name: the metric label and log field of what it does."""
        if self.pipeline_name:
            return self.pipeline_name
        name = re.sub(r"[^a-z0-9_-]", "_", self.source[1].lower())
        return name if name[:1].isalpha() else f"p_{name}"[:63]

    @cached_property
    def text_column_list(self) -> tuple[str, ...]:
        return tuple(self.text_columns.split(","))

    @cached_property
    def key_column_list(self) -> tuple[str, ...] | None:
        """The configured key columns; None: the source table's primary key, read at start."""
        configured = self.key_columns or self.key_column
        return tuple(configured.split(",")) if configured else None

    @cached_property
    def source_topic(self) -> str:
        schema, table = self.source
        return f"{self.topic_prefix}.{schema}.{table}"

    # One retry and one dead-letter topic per consumer group, for all its pipelines: records find their
    # pipeline again by their origin header, and two groups never consume each other's retries.
    @cached_property
    def retry_topic(self) -> str:
        return f"{self.consumer_group}.retry"

    @cached_property
    def dlq_topic(self) -> str:
        return f"{self.consumer_group}.dlq"

    def database_parts(self, dsn: str | None = None) -> dict[str, str]:
        """Host, port, user, password and database name of the source (or of `dsn`), for Debezium."""
        return conninfo.parts(dsn or self.dsn)

    def redacted_dsn(self, dsn: str | None = None) -> str:
        """The source database's URL or conninfo (or `dsn`) for logs, passwords masked."""
        return conninfo.redacted(dsn or self.dsn)


def load_settings() -> Settings:
    """Read settings from the environment; a bad value raises SettingsError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            where = env_name(field) if field else "settings"
            problems.append(f"{where}: {error['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
