"""consumer.settings: defaults, CDC_* overrides, errors that name the variable, derived values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumer.settings import DEFAULT_MODEL, Settings, SettingsError, env_name, load_settings


def load_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_env_name() -> None:
    assert env_name("batch_max_events") == "CDC_BATCH_MAX_EVENTS"


@pytest.mark.parametrize(
    ("env", "columns"),
    [({"CDC_KEY_COLUMNS": "tenant, id"}, ("tenant", "id")), ({"CDC_KEY_COLUMN": "doc_id"}, ("doc_id",))],
)
def test_key_columns(env: dict[str, str], columns: tuple[str, ...]) -> None:
    assert Settings.from_env_map(env).key_column_list == columns


def test_key_columns_and_key_column_disagreeing_is_refused() -> None:
    with pytest.raises(ValidationError, match="CDC_KEY_COLUMNS or CDC_KEY_COLUMN"):
        Settings.from_env_map({"CDC_KEY_COLUMNS": "a,b", "CDC_KEY_COLUMN": "a"})


def test_defaults() -> None:
    s = load_settings()
    assert s.database_url is None
    assert s.uses_embedded_postgres is True
    assert s.uses_embedded_kafka is True
    assert s.dsn == "postgresql://cdc:cdc@127.0.0.1:54329/cdc"
    assert s.bootstrap_servers == "127.0.0.1:19092"
    assert s.connect_rest_url == "http://127.0.0.1:18083"
    assert s.source_table == "public.documents"
    assert s.vector_table == "public.document_embeddings"
    assert s.key_column_list is None  # the source table's primary key
    assert (s.on_model_change, s.model_timeout_s) == ("refuse", 300.0)
    assert s.text_column_list == ("title", "body")
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.topic_prefix == "cdc"
    assert s.consumer_group == "cdc-embedder"
    assert s.model == DEFAULT_MODEL == "thenlper/gte-small"
    assert s.max_seq_length == 512
    assert s.max_text_chars == 200_000
    assert (s.batch_max_events, s.batch_max_wait_ms) == (256, 10)
    assert s.retry_max_attempts == 5
    assert (s.retry_backoff_initial_s, s.retry_backoff_max_s) == (2.0, 300.0)
    assert (s.http_host, s.http_port) == ("0.0.0.0", 9400)
    assert (s.log_level, s.log_format) == ("INFO", "auto")
    assert s.liveness_stall_s == 30.0
    assert (s.hnsw_m, s.hnsw_ef_construction) == (16, 64)  # pgvector's own


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("CDC_BATCH_MAX_EVENTS", "8", "batch_max_events", 8),
        ("CDC_BATCH_MAX_WAIT_MS", "50", "batch_max_wait_ms", 50),
        ("CDC_HNSW_M", "8", "hnsw_m", 8),
        ("CDC_HNSW_EF_CONSTRUCTION", "200", "hnsw_ef_construction", 200),
        ("CDC_RETRY_BACKOFF_MAX_S", "60.5", "retry_backoff_max_s", 60.5),
        ("CDC_RETRY_MAX_ATTEMPTS", "2", "retry_max_attempts", 2),
        ("CDC_LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
        ("CDC_MODEL", "/models/minilm", "model", "/models/minilm"),
        ("CDC_HTTP_PORT", "0", "http_port", 0),
        ("CDC_TEXT_COLUMNS", " title , body ,summary ", "text_column_list", ("title", "body", "summary")),
        ("CDC_TEXT_COLUMNS", "content", "text_column_list", ("content",)),
        ("CDC_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092", "bootstrap_servers", "k1:9092,k2:9092"),
        ("CDC_CONNECT_URL", "http://connect:8083/", "connect_rest_url", "http://connect:8083"),
        ("CDC_DATABASE_URL", "postgresql://u:p@db:5432/app", "dsn", "postgresql://u:p@db:5432/app"),
    ],
)
def test_env_override(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, attribute: str, expected: object
) -> None:
    assert getattr(load_with(monkeypatch, **{variable: value}), attribute) == expected


def test_external_services_switch_off_the_embedded_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_with(monkeypatch, CDC_DATABASE_URL="postgresql://db/app", CDC_KAFKA_BOOTSTRAP_SERVERS="k:9092")
    assert s.uses_embedded_postgres is False
    assert s.uses_embedded_kafka is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CDC_BATCH_MAX_EVENTS", "abc"),
        ("CDC_BATCH_MAX_EVENTS", "0"),
        ("CDC_BATCH_MAX_WAIT_MS", "-5"),
        ("CDC_HTTP_PORT", "70000"),
        ("CDC_LOG_LEVEL", "LOUD"),
        ("CDC_DATABASE_SSLMODE", "sometimes"),
        ("CDC_DATABASE_POOL_SIZE", "0"),
        ("CDC_RETRY_MAX_ATTEMPTS", "0"),
        ("CDC_RETRY_BACKOFF_INITIAL_S", "0"),
        ("CDC_MAX_TEXT_CHARS", "0"),
        ("CDC_HNSW_M", "1"),
        ("CDC_HNSW_EF_CONSTRUCTION", "2000"),
        ("CDC_EMBED_DTYPE", "float16"),
        ("CDC_KAFKA_SECURITY_PROTOCOL", "SASL"),
        ("CDC_KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("CDC_SOURCE_TABLE", "a.b.c"),
        ("CDC_VECTOR_TABLE", "public.vectors;drop"),
        ("CDC_KEY_COLUMN", "id; drop table x"),
        ("CDC_TEXT_COLUMNS", " , "),
        ("CDC_TEXT_COLUMNS", "title,1body"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_with(monkeypatch, **{variable: value})
    message = str(info.value)
    assert message.startswith("invalid configuration: ")
    assert f"{variable}:" in message
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None  # raised "from None": no pydantic traceback in the log


def test_several_bad_values_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as info:
        load_with(monkeypatch, CDC_BATCH_MAX_EVENTS="many", CDC_LOG_LEVEL="LOUD")
    assert "CDC_BATCH_MAX_EVENTS:" in str(info.value)
    assert "CDC_LOG_LEVEL:" in str(info.value)


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"CDC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
        {"CDC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "CDC_KAFKA_SASL_USERNAME": "embedder"},
        {"CDC_KAFKA_SASL_USERNAME": "embedder", "CDC_KAFKA_SASL_PASSWORD": "s3cret"},
        {
            "CDC_KAFKA_SASL_MECHANISM": "PLAIN",
            "CDC_KAFKA_SASL_USERNAME": "embedder",
            "CDC_KAFKA_SASL_PASSWORD": "",
        },
    ],
    ids=["nothing", "mechanism-only", "no-password", "no-mechanism", "empty-password"],
)
def test_sasl_without_credentials_fails_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, protocol: str, credentials: dict[str, str]
) -> None:
    with pytest.raises(SettingsError) as info:
        load_with(monkeypatch, CDC_KAFKA_SECURITY_PROTOCOL=protocol, **credentials)
    message = str(info.value)
    assert f"CDC_KAFKA_SECURITY_PROTOCOL={protocol}" in message
    for variable in ("CDC_KAFKA_SASL_MECHANISM", "CDC_KAFKA_SASL_USERNAME", "CDC_KAFKA_SASL_PASSWORD"):
        assert variable in message


def test_sasl_with_credentials_keeps_the_password_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_with(
        monkeypatch,
        CDC_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        CDC_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        CDC_KAFKA_SASL_USERNAME="embedder",
        CDC_KAFKA_SASL_PASSWORD="hunter2-secret",
    )
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == "hunter2-secret"
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in str(s)


def test_backoff_initial_above_max_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as info:
        load_with(monkeypatch, CDC_RETRY_BACKOFF_INITIAL_S="30", CDC_RETRY_BACKOFF_MAX_S="10")
    assert "CDC_RETRY_BACKOFF_INITIAL_S" in str(info.value)
    assert "CDC_RETRY_BACKOFF_MAX_S" in str(info.value)


def test_hnsw_ef_construction_below_twice_m_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """pgvector would refuse the index; the consumer refuses the setting before it creates anything."""
    with pytest.raises(SettingsError) as info:
        load_with(monkeypatch, CDC_HNSW_M="32", CDC_HNSW_EF_CONSTRUCTION="40")
    assert "CDC_HNSW_EF_CONSTRUCTION" in str(info.value)
    assert "CDC_HNSW_M" in str(info.value)
    assert load_with(monkeypatch, CDC_HNSW_EF_CONSTRUCTION="64").hnsw_m == 32  # exactly twice is allowed


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        setattr(s, "batch_max_events", 1)  # noqa: B010


# --- derived values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "source", "target", "topic"),
    [
        ({}, ("public", "documents"), ("public", "document_embeddings"), "cdc.public.documents"),
        (
            {"CDC_TOPIC_PREFIX": "shop", "CDC_SOURCE_TABLE": "sales.orders", "CDC_VECTOR_TABLE": "vec.o"},
            ("sales", "orders"),
            ("vec", "o"),
            "shop.sales.orders",
        ),
        (
            {"CDC_SOURCE_TABLE": "notes", "CDC_VECTOR_TABLE": "note_vectors"},
            ("public", "notes"),
            ("public", "note_vectors"),
            "cdc.public.notes",
        ),
    ],
)
def test_derived_topics(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    source: tuple[str, str],
    target: tuple[str, str],
    topic: str,
) -> None:
    s = load_with(monkeypatch, **env)
    assert s.source == source
    assert s.target == target
    assert s.source_topic == topic
    # named by the consumer group, shared by its pipelines
    group = env.get("CDC_CONSUMER_GROUP", "cdc-embedder")
    assert (s.retry_topic, s.dlq_topic) == (f"{group}.retry", f"{group}.dlq")


@pytest.mark.parametrize(
    ("url", "sslmode", "dsn"),
    [
        ("postgresql://u:p@db/app", "require", "postgresql://u:p@db/app?sslmode=require"),
        (
            "postgresql://u:p@db/app?application_name=x",
            "verify-full",
            "postgresql://u:p@db/app?application_name=x&sslmode=verify-full",
        ),
        ("postgresql://u:p@db/app", None, "postgresql://u:p@db/app"),
    ],
)
def test_dsn_appends_sslmode(
    monkeypatch: pytest.MonkeyPatch, url: str, sslmode: str | None, dsn: str
) -> None:
    env = {"CDC_DATABASE_URL": url} | ({"CDC_DATABASE_SSLMODE": sslmode} if sslmode else {})
    assert load_with(monkeypatch, **env).dsn == dsn


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        (
            None,
            {"hostname": "127.0.0.1", "port": "54329", "user": "cdc", "password": "cdc", "dbname": "cdc"},
        ),
        (
            "postgresql://app%40corp:p%40ss%3Aw@db.example.com:6543/vectors?sslmode=require",
            {
                "hostname": "db.example.com",
                "port": "6543",
                "user": "app@corp",
                "password": "p@ss:w",
                "dbname": "vectors",
            },
        ),
        (
            "postgresql://reader@db",
            {"hostname": "db", "port": "5432", "user": "reader", "password": "", "dbname": "postgres"},
        ),
    ],
)
def test_database_parts(monkeypatch: pytest.MonkeyPatch, url: str | None, parts: dict[str, str]) -> None:
    s = load_with(monkeypatch, **({"CDC_DATABASE_URL": url} if url else {}))
    assert s.database_parts() == parts


@pytest.mark.parametrize(
    ("url", "password", "redacted"),
    [
        (None, "cdc", "postgresql://cdc:***@127.0.0.1:54329/cdc"),
        ("postgresql://app:hunter2@db:5432/app", "hunter2", "postgresql://app:***@db:5432/app"),
        ("postgresql://app:p%40ss%2Fw@db/app", "p%40ss%2Fw", "postgresql://app:***@db/app"),
        ("postgresql://app:p%2fss@db/app", "p%2fss", "postgresql://app:***@db/app"),
        ("postgresql://app:p!ss*@db/app", "p!ss*", "postgresql://app:***@db/app"),
        # the user name equal to the password must stay readable
        ("postgresql://same:same@db/app", None, "postgresql://same:***@db/app"),
    ],
)
def test_redacted_dsn_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, url: str | None, password: str | None, redacted: str
) -> None:
    s = load_with(monkeypatch, **({"CDC_DATABASE_URL": url} if url else {}))
    assert s.redacted_dsn() == redacted
    if password is not None:
        assert f":{password}@" not in s.redacted_dsn()


def test_redacted_dsn_without_password_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_with(monkeypatch, CDC_DATABASE_URL="postgresql://app@db/app", CDC_DATABASE_SSLMODE="require")
    assert s.redacted_dsn() == "postgresql://app@db/app?sslmode=require"


def test_redacted_dsn_hides_a_query_password(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_with(monkeypatch, CDC_DATABASE_URL="postgresql://db/app?user=app&password=hunter2")
    assert "hunter2" not in s.redacted_dsn()


@pytest.mark.parametrize(
    ("variable", "embedded", "address"),
    [
        ("CDC_DATABASE_URL", "uses_embedded_postgres", "dsn"),
        ("CDC_KAFKA_BOOTSTRAP_SERVERS", "uses_embedded_kafka", "bootstrap_servers"),
    ],
)
def test_empty_service_address_is_consistent(
    monkeypatch: pytest.MonkeyPatch, variable: str, embedded: str, address: str
) -> None:
    s = load_with(monkeypatch, **{variable: ""})
    points_at_local_stack = "127.0.0.1" in getattr(s, address)
    assert getattr(s, embedded) is points_at_local_stack


# --- table and column names -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["documents", "public.documents", "_s.t$1", "Sales.Orders2"])
def test_valid_table_names(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    s = load_with(monkeypatch, CDC_SOURCE_TABLE=name, CDC_VECTOR_TABLE=name)
    assert (s.source_table, s.vector_table) == (name, name)


@pytest.mark.parametrize(
    "name",
    [
        "a.b.c",
        "public.",
        ".documents",
        "1documents",
        "pub lic.documents",
        'public."documents"',
        "documents;drop table x",
        "public.docu-ments",
    ],
)
@pytest.mark.parametrize("variable", ["CDC_SOURCE_TABLE", "CDC_VECTOR_TABLE"])
def test_invalid_table_names(monkeypatch: pytest.MonkeyPatch, variable: str, name: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}: .*is not a table name like schema.table"):
        load_with(monkeypatch, **{variable: name})


def test_chunking_needs_a_local_model_and_an_overlap_under_half_the_window() -> None:
    with pytest.raises(ValidationError, match="CDC_CHUNKING=chunk needs the model's tokenizer"):
        Settings.from_env_map({"CDC_CHUNKING": "chunk", "CDC_EMBEDDER": "openai", "CDC_OPENAI_MODEL": "m"})
    with pytest.raises(ValidationError, match="CDC_CHUNK_OVERLAP_TOKENS must be under half"):
        Settings.from_env_map({"CDC_CHUNKING": "chunk", "CDC_CHUNK_OVERLAP_TOKENS": "256"})
    assert Settings.from_env_map({"CDC_CHUNKING": "chunk"}).chunk_target == (
        "public",
        "document_embeddings_chunks",
    )


def test_vectors_in_another_database() -> None:
    same = Settings.from_env_map({"CDC_DATABASE_URL": "postgresql://u:p@db/app"})
    assert same.vector_dsn == same.dsn and not same.separate_vector_database
    apart = Settings.from_env_map(
        {
            "CDC_DATABASE_URL": "postgresql://u:p@db/app",
            "CDC_VECTOR_DATABASE_URL": "postgresql://v:secret@vdb/vec",
        }
    )
    assert apart.separate_vector_database and apart.vector_dsn == "postgresql://v:secret@vdb/vec"
    assert "secret" not in apart.redacted_dsn(apart.vector_dsn)
    local = Settings.from_env_map({"CDC_STACK_VECTOR_DATABASE": "true", "CDC_STACK_VECTOR_PG_PORT": "6000"})
    assert local.vector_dsn == "postgresql://cdc:cdc@127.0.0.1:6000/cdc" and local.separate_vector_database
