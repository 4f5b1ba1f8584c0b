"""Kafka clients built from settings: security options, the publisher, topic set-up and lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context

from consumer.errors import OperatorError
from consumer.logs import get_logger
from consumer.retry import Headers
from consumer.settings import Settings, env_name
from consumer.topics import (
    CHECKED,
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    TopicPlan,
    TopicSetupError,
    creation_errors,
    described_configs,
    fix_command,
    plan_topics,
    shortfalls,
)

# New topics (Debezium creates the source topic on its first event) must be seen within seconds.
METADATA_MAX_AGE_MS = 5000
TOPIC_POLL_S = 2.0
TOPIC_PROGRESS_EVERY_S = 30.0

log = get_logger("cdc_embedder.kafka")

# The largest record a fetch brings (aiokafka's default fetch_max_bytes) plus room for the cdc-* headers
# of its retry or dead-letter copy: the producer itself never refuses a copy of a record it was given;
# only a topic's max.message.bytes can, and then a reference dead letter goes instead.
MAX_REQUEST_BYTES = 50 * 1024 * 1024 + 64 * 1024


class KafkaUnavailable(OperatorError):
    """The brokers cannot be reached; the message names the setting."""


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": "cdc-embedder",
    }
    if settings.kafka_security_protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": password.get_secret_value() if password else None,
        }
    return options


def unreachable(settings: Settings, exc: BaseException) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"Kafka not reachable at {settings.bootstrap_servers} ({exc}): set "
        f"{env_name('kafka_bootstrap_servers')} (and {env_name('kafka_security_protocol')} for TLS/SASL)"
    )


def make_consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **client_options(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # retry records of aborted batches are never seen
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        # Kafka's own defaults since 3.0: a busy 2-core machine can starve heartbeats for a few seconds.
        session_timeout_ms=45000,
        heartbeat_interval_ms=3000,
        **overrides,
    )


def make_producer(settings: Settings, transactional: bool = False) -> AIOKafkaProducer:
    # One transactional id per process: two consumers on one host must not fence each other.
    txn_id = f"{settings.consumer_group}-{socket.gethostname()}-{os.getpid()}" if transactional else None
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=MAX_REQUEST_BYTES,
        transactional_id=txn_id,
    )


async def stop_groupless(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer without a group.

    aiokafka's group-less coordinator re-raises the CancelledError of its own housekeeping task when it
    is stopped before that task ran: not a cancellation of ours, unless this task is being cancelled.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def read_whole_topic(
    consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30
) -> list[TopicPartition]:
    """Give a group-less consumer every partition of `topic`, at the beginning; [] if there is no topic.

    Subscribing without a group assigns all partitions once metadata arrives, through public API only
    (`partitions_for_topic` does not fetch metadata, so a fresh consumer would see no partitions).
    """
    if topic not in await consumer.topics():
        return []
    consumer.subscribe([topic])
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not consumer.assignment():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no partitions of {topic} assigned within {timeout_s:.0f}s")
        await asyncio.sleep(0.05)
    tps = sorted(consumer.assignment())
    await consumer.seek_to_beginning(*tps)
    return tps


class KafkaPublisher:
    """Publishes and waits for the broker's acknowledgement (acks=all, idempotent producer)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def publish(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)


@contextlib.asynccontextmanager
async def admin_client(settings: Settings, timeout_s: float = 60.0) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise unreachable(settings, exc) from exc
    try:
        yield admin
    finally:
        await admin.close()


async def wait_for_topic(
    admin: AIOKafkaAdminClient, topic: str, stop: asyncio.Event, poll_s: float = TOPIC_POLL_S
) -> bool:
    """Return True once `topic` exists, False if `stop` is set first; there is no other bound.

    Debezium creates the source topic with the first change it captures, with the partitions of its
    topic.creation settings. Until then the consumer must not subscribe: a metadata request for a
    missing topic lets a broker with auto.create.topics.enable create it with its own defaults, and
    aiokafka (0.14) sets allow_auto_topic_creation in every such request, with no option to clear it.
    """
    loop = asyncio.get_running_loop()
    began = next_report = loop.time()
    while not stop.is_set():
        try:
            if topic in await admin.list_topics():  # all topics: never auto-creates
                if next_report > began:
                    log.info("topic appeared", topic=topic, waited_s=round(loop.time() - began))
                return True
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("listing topics failed; retrying", topic=topic, error=repr(exc))
        if loop.time() >= next_report:
            log.info(
                "waiting for the topic",
                topic=topic,
                waited_s=round(loop.time() - began),
                hint="Debezium creates it with the first change it captures: is the connector registered "
                "and RUNNING (cdc-embedder connector status), and does the source table have rows?",
            )
            next_report += TOPIC_PROGRESS_EVERY_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
    return False


async def ensure_topics(
    admin: AIOKafkaAdminClient, settings: Settings, sources: Sequence[str] | None = None
) -> None:
    """Create the retry and dead-letter topics like the source topics (of every pipeline; by default
    the one of `settings`), which must exist: as many partitions as the widest, room for the largest
    record of any. Warn where existing ones fall short. Only topics known to exist are described: that
    asks for their metadata."""
    sources = list(sources or [settings.source_topic])
    existing = set(await admin.list_topics())
    ours = [t for t in (settings.retry_topic, settings.dlq_topic) if t in existing]
    wanted = dict.fromkeys(CHECKED)
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, wanted) for t in [*sources, *ours]]
    )
    configs = described_configs(r.to_object() for r in described)
    brokers = len((await admin.describe_cluster())["brokers"])
    partitions = max([await _source_partitions(admin, settings, topic) for topic in sources])
    max_bytes = max(_source_max_bytes(configs, topic) for topic in sources)
    plans = plan_topics(settings, partitions, max_bytes, brokers)
    await _create_topics(admin, [p for p in plans if p.name not in existing])
    for plan in plans:
        if plan.name in existing and (short := shortfalls(plan.configs, configs.get(plan.name, {}))):
            log.warning(
                "existing topic may lose or refuse records",
                topic=plan.name,
                have={k: configs[plan.name][k] for k in short},
                want=short,
                fix=fix_command(plan.name, short),
            )


async def _source_partitions(admin: AIOKafkaAdminClient, settings: Settings, topic: str) -> int:
    (source,) = await admin.describe_topics([topic])
    if not source["partitions"] and settings.topic_partitions is None:
        raise TopicSetupError(
            f"cannot see the partitions of {topic} (error code {source['error_code']}): "
            f"grant the consumer Describe on it, or set {env_name('topic_partitions')}"
        )
    return len(source["partitions"])


def _source_max_bytes(configs: dict[str, dict[str, str]], topic: str) -> int:
    value = configs.get(topic, {}).get("max.message.bytes")
    if value is None:
        log.warning(
            "cannot read the source topic's max.message.bytes; assuming Kafka's default",
            topic=topic,
            assumed=KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
            fix="grant the consumer DescribeConfigs on the topic",
        )
        return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    return int(value)


async def _create_topics(admin: AIOKafkaAdminClient, plans: list[TopicPlan]) -> None:
    if not plans:
        return
    response = await admin.create_topics(
        [NewTopic(p.name, p.partitions, p.replication_factor, topic_configs=p.configs) for p in plans]
    )
    if failed := creation_errors(response.to_object()):
        raise TopicSetupError(
            f"creating {', '.join(f'{t} ({e})' for t, e in failed.items())} failed: check "
            f"{env_name('topic_replication_factor')}, {env_name('topic_min_insync_replicas')}, "
            f"{env_name('topic_partitions')} and the consumer's permission to create topics"
        )
    for p in plans:
        log.info(
            "created topic",
            topic=p.name,
            partitions=p.partitions,
            replicas=p.replication_factor,
            configs=p.configs,
        )


async def partition_lag(
    consumer: AIOKafkaConsumer, partitions: set[TopicPartition]
) -> dict[TopicPartition, int]:
    """High-water mark minus position for each assigned partition."""
    if not partitions:
        return {}
    try:
        ends = await consumer.end_offsets(list(partitions))
    except (KafkaConnectionError, KafkaError):
        return {}
    lags = {}
    for tp in partitions:
        try:
            position = await consumer.position(tp)
        except KafkaError:
            continue
        lags[tp] = max(ends.get(tp, position) - position, 0)
    return lags
