"""No broker of ours creates a topic because a client asked for it: Debezium and the consumer do.

aiokafka's metadata requests always allow auto-creation (no client option turns it off), so a consumer
subscribing before Debezium created the source topic would create it with the broker's defaults (its
partition count, above all) on a broker with auto.create.topics.enable. The broker setting is the lever.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from consumer.settings import Settings
from consumer.stack.kafka import EmbeddedKafka
from consumer.stack.maven import JarDirs

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_stack_broker_does_not_auto_create(tmp_path: Path) -> None:
    kafka = EmbeddedKafka(Settings(stack_dir=tmp_path), JarDirs(tmp_path, tmp_path, tmp_path))
    kafka._write_config()
    lines = kafka.properties.read_text().splitlines()
    assert "auto.create.topics.enable=false" in lines


def test_the_compose_broker_does_not_auto_create() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["kafka"]["environment"]
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
