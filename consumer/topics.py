"""What the retry and dead-letter topics must be: partitions, replication, retention and record size.

Pure functions of the settings and of what the cluster says about the source topic and its brokers:
consumer.kafka.ensure_topics creates the topics from them, and tests hold deploy/k8s/kafkatopics.yaml
(the Strimzi KafkaTopics) to the same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import TopicAlreadyExistsError, for_code

from consumer.errors import OperatorError
from consumer.settings import Settings, env_name

WEEK_MS = 7 * 24 * 3600 * 1000
# A retried record waits at most CDC_RETRY_BACKOFF_MAX_S per attempt; keep it several times that long
# (and a week at least), so a consumer that was down for a while still finds its pending retries.
RETRY_RETENTION_FACTOR = 4
# Our headers on a retried or dead-lettered record: an error message of at most 2000 bytes
# (consumer.retry) plus a few names and numbers, far below this.
HEADER_HEADROOM_BYTES = 64 * 1024
# The broker's message.max.bytes default, which a topic that sets no max.message.bytes gets.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Configs whose value on an existing topic can lose records or refuse them; checked at start.
CHECKED = ("cleanup.policy", "retention.ms", "retention.bytes", "max.message.bytes")
UNLIMITED = "-1"


class TopicSetupError(OperatorError):
    """The retry or dead-letter topic cannot be set up as it must be; the message names the fix."""


@dataclass(frozen=True, slots=True)
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]


def replication(settings: Settings, brokers: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas: three copies where there are three brokers, and a
    write acknowledged by all but one of them, so one broker may be down."""
    replicas = settings.topic_replication_factor or max(1, min(3, brokers))
    min_insync = settings.topic_min_insync_replicas or max(1, replicas - 1)
    if min_insync > replicas:
        raise TopicSetupError(
            f"{env_name('topic_min_insync_replicas')}={min_insync} exceeds the replication factor "
            f"{replicas} ({brokers} brokers): lower it or set {env_name('topic_replication_factor')}"
        )
    return replicas, min_insync


def retry_retention_ms(settings: Settings) -> int:
    longest_wait_s = settings.retry_backoff_max_s * settings.retry_max_attempts
    return max(WEEK_MS, int(RETRY_RETENTION_FACTOR * longest_wait_s * 1000))


def plan_topics(
    settings: Settings, source_partitions: int, source_max_message_bytes: int, brokers: int
) -> list[TopicPlan]:
    """The retry topic, then the dead-letter topic, as they must be created."""
    replicas, min_insync = replication(settings, brokers)
    common = {
        "cleanup.policy": "delete",  # never compact: dead letters of one key must all stay
        "min.insync.replicas": str(min_insync),
        # a record of the source topic's largest size must fit with our headers
        "max.message.bytes": str(source_max_message_bytes + HEADER_HEADROOM_BYTES),
        "retention.bytes": UNLIMITED,
    }
    retry = common | {"retention.ms": str(retry_retention_ms(settings))}
    dead_letters = common | {"retention.ms": UNLIMITED}  # kept until replayed or deleted by hand
    partitions = settings.topic_partitions or source_partitions
    return [
        TopicPlan(settings.retry_topic, partitions, replicas, retry),
        TopicPlan(settings.dlq_topic, partitions, replicas, dead_letters),
    ]


def _at_least(have: str, want: str) -> bool:
    """A retention or size limit `have` is no tighter than `want` (-1: unlimited)."""
    if have == UNLIMITED:
        return True
    return want != UNLIMITED and int(have) >= int(want)


def shortfalls(wanted: Mapping[str, str], actual: Mapping[str, str]) -> dict[str, str]:
    """The CHECKED configs of an existing topic that fall short, with the value each should have."""
    short = {}
    for key in CHECKED:
        have, want = actual.get(key), wanted[key]
        if have is None:
            continue  # not described (no DescribeConfigs permission): nothing to say
        if not (have == want if key == "cleanup.policy" else _at_least(have, want)):
            short[key] = want
    return short


def fix_command(topic: str, short: Mapping[str, str]) -> str:
    settings = ",".join(f"{k}={v}" for k, v in short.items())
    return (
        f"kafka-configs.sh --bootstrap-server <brokers> --alter --entity-type topics --entity-name {topic} "
        f"--add-config {settings} (on Strimzi: the KafkaTopic's spec.config)"
    )


def described_configs(responses: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Topic name to its configs, from DescribeConfigs responses (as `to_object()`); failed ones left out."""
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response["resources"]:
            if resource["error_code"] == 0:
                configs[resource["resource_name"]] = {
                    entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]
                }
    return configs


def creation_errors(response: Mapping[str, Any]) -> dict[str, str]:
    """Topic name to what went wrong, from a CreateTopics response; a topic that exists is no error."""
    errors = {}
    for result in response["topic_errors"]:
        code = result["error_code"]
        if code not in (0, TopicAlreadyExistsError.errno):
            message = result.get("error_message")
            errors[result["topic"]] = for_code(code).__name__ + (f": {message}" if message else "")
    return errors
