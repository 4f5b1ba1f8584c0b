"""The Debezium connector config in connectors/documents.json and the overrides applied before a PUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.connectors import (
    ConnectorError,
    connector_config,
    default_connector_path,
    load_connector_file,
)
from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONNECTOR_JSON = REPO / "connectors" / "documents.json"
DB_FIELDS = ("database.hostname", "database.port", "database.user", "database.password", "database.dbname")


def _settings(**overrides: object) -> Settings:
    # Explicit values, so a developer's CDC_* environment cannot change what the test sees.
    values: dict[str, object] = {
        "database_url": None,
        "source_table": "public.documents",
        "topic_prefix": "cdc",
        "stack_topic_partitions": 3,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_file_is_what_a_user_posts() -> None:
    raw = json.loads(CONNECTOR_JSON.read_text())
    assert set(raw) == {"name", "config"}
    assert raw["name"] == "cdc-embedder-documents"
    assert all(isinstance(value, str) for value in raw["config"].values())


def test_default_path_finds_the_repo_file() -> None:
    assert default_connector_path() == CONNECTOR_JSON


def test_debezium_settings() -> None:
    config = load_connector_file(CONNECTOR_JSON)["config"]
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert config["plugin.name"] == "pgoutput"
    # The publication is created FOR the captured table only (with the table, or by deploy/sql/roles.sql),
    # so writes to the vector table never feed back; Debezium must not alter it (that needs ownership).
    assert config["publication.autocreate.mode"] == "disabled"
    assert config["publication.name"] == "cdc_embedder"
    assert config["slot.name"] == "cdc_embedder"
    assert config["snapshot.mode"] == "initial"
    assert int(config["heartbeat.interval.ms"]) > 0
    assert config["tombstones.on.delete"] == "true"
    assert config["decimal.handling.mode"] == "string"
    for side in ("key", "value"):
        assert config[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
        assert config[f"{side}.converter.schemas.enable"] == "false"
    assert config["topic.creation.default.replication.factor"] == "-1"


def test_database_fields_are_env_placeholders_only() -> None:
    text = CONNECTOR_JSON.read_text()
    config = load_connector_file(CONNECTOR_JSON)["config"]
    for field in DB_FIELDS:
        assert config[field].startswith("${env:CDC_PG_") and config[field].endswith("}"), field
    # the local stack's password must not be in the file in any form
    assert '"cdc"' not in text.replace('"topic.prefix": "cdc"', "")
    assert "password" not in text.replace('"database.password": "${env:CDC_PG_PASSWORD}"', "")


def test_overrides_come_from_settings() -> None:
    spec = connector_config(
        _settings(source_table="app.articles", topic_prefix="shop", stack_topic_partitions=6), CONNECTOR_JSON
    )
    config = spec["config"]
    assert spec["name"] == "cdc-embedder-documents"
    assert config["table.include.list"] == "app.articles"
    assert config["topic.prefix"] == "shop"
    assert config["topic.creation.default.partitions"] == "6"
    assert config["plugin.name"] == "pgoutput"


def test_payload_never_carries_the_database_password() -> None:
    settings = _settings(database_url="postgresql://app:s3cr3t-pw@db.example:5432/app")
    payload = json.dumps(connector_config(settings, CONNECTOR_JSON))
    assert "s3cr3t-pw" not in payload
    assert "${env:CDC_PG_PASSWORD}" in payload


def test_overrides_do_not_change_the_file(tmp_path: Path) -> None:
    copy = tmp_path / "documents.json"
    copy.write_text(CONNECTOR_JSON.read_text())
    connector_config(_settings(source_table="app.articles"), copy)
    assert json.loads(copy.read_text())["config"]["table.include.list"] == "public.documents"


def test_non_string_values_are_sent_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "config": {"tasks.max": 1, "tombstones.on.delete": True}}))
    config = load_connector_file(path)["config"]
    assert config == {"tasks.max": "1", "tombstones.on.delete": "true"}


@pytest.mark.parametrize("content", ["not json", "[]", '{"name": "x"}', '{"config": {}}'])
def test_malformed_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConnectorError, match=str(path)):
        load_connector_file(path)


def test_the_connector_captures_every_declared_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        "pipelines:\n"
        "  a: {source_table: shop.orders, text_columns: [notes], vector_table: shop.order_vectors}\n"
        "  b: {source_table: crm.notes, text_template: '{body}', vector_table: crm.note_vectors}\n"
    )
    config = connector_config(_settings(pipelines_file=path), tables=("public.cdc_embedder_signal",))[
        "config"
    ]
    # the CDC_SOURCE_TABLE default is no pipeline once a file declares them
    assert config["table.include.list"] == "shop.orders,crm.notes,public.cdc_embedder_signal"
