"""Kafka clients built from settings: security options, the publisher, topic set-up and lag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from consumer.errors import OperatorError
from consumer.retry import Headers
from consumer.settings import Settings, env_name

# New topics (Debezium creates the source topic on its first event) must be seen within seconds.
METADATA_MAX_AGE_MS = 5000
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


async def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> None:
    """Create the retry and dead-letter topics with as many partitions as the source topic."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=15000)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise unreachable(settings, exc) from exc
    try:
        existing = set(await admin.list_topics())
        partitions = settings.stack_topic_partitions
        if settings.source_topic in existing:
            described = await admin.describe_topics([settings.source_topic])
            partitions = len(described[0]["partitions"]) or partitions
        missing = [t for t in (settings.retry_topic, settings.dlq_topic) if t not in existing]
        if missing:
            # Three copies where the cluster has three brokers, as for the source topic; fewer on a laptop.
            replicas = min(3, len((await admin.describe_cluster())["brokers"]))
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=replicas) for t in missing]
                )
    finally:
        await admin.close()


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
