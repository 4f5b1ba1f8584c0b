"""What an operator meets on the real stack: topics that keep dead letters, and logs that are JSON."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumer.consumer_process import ConsumerProcess
from consumer.kafka import admin_client
from consumer.settings import Settings

pytestmark = pytest.mark.integration


async def topic_configs(settings: Settings, topics: list[str]) -> dict[str, dict[str, str]]:
    async with admin_client(settings) as admin:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        )
    configs: dict[str, dict[str, str]] = {}
    for response in described:
        for resource in response.resources:
            _, _, _, name, entries = resource
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


def test_dead_letters_never_expire_and_retries_outlast_the_backoff(
    pipeline: ConsumerProcess, settings: Settings
) -> None:
    configs = asyncio.run(
        topic_configs(settings, [settings.source_topic, settings.retry_topic, settings.dlq_topic])
    )
    dlq, retry, source = (
        configs[settings.dlq_topic],
        configs[settings.retry_topic],
        configs[settings.source_topic],
    )
    assert dlq["retention.ms"] == "-1" and dlq["retention.bytes"] == "-1"
    assert int(retry["retention.ms"]) >= 7 * 24 * 3600 * 1000
    assert int(retry["retention.ms"]) >= settings.retry_backoff_max_s * settings.retry_max_attempts * 1000
    for topic in (dlq, retry):
        assert int(topic["max.message.bytes"]) > int(source["max.message.bytes"])
        assert topic["cleanup.policy"] == "delete"


def test_every_log_line_of_the_consumer_is_json(pipeline: ConsumerProcess) -> None:
    """Including any of aiokafka and psycopg, which log through the standard library (the rendering of
    those is tests/unit/test_logs.py's)."""
    lines = [line for line in pipeline.log_file.read_text(errors="replace").splitlines() if line.strip()]
    assert len(lines) > 10
    for line in lines:
        entry = json.loads(line)  # raises on any line that is not JSON
        assert {"event", "level", "timestamp"} <= entry.keys(), line
