"""Replaying dead-lettered records to the source topic once their cause is fixed.

Replaying is safe to repeat: each record carries its WAL position, so re-applying an event the vector
table already reflects (or one a newer change superseded) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.kafka import (
    KafkaPublisher,
    client_options,
    make_producer,
    read_whole_topic,
    stop_groupless,
    unreachable,
)
from consumer.retry import (
    H_ERROR_CLASS,
    H_FIRST_FAILURE_MS,
    H_ORIGINAL_TOPIC,
    H_PAYLOAD_DROPPED,
    H_PIPELINE,
    H_REPLAYED_AT_MS,
    now_ms,
)
from consumer.settings import Settings


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    error_class: str | None = None
    pipeline: str | None = None
    since_ms: int | None = None  # by first failure time
    until_ms: int | None = None

    def matches(self, headers: dict[str, bytes]) -> bool:
        if self.error_class is not None and headers.get(H_ERROR_CLASS, b"").decode() != self.error_class:
            return False
        if self.pipeline is not None and headers.get(H_PIPELINE, b"").decode() != self.pipeline:
            return False
        try:
            failed_ms = int(headers.get(H_FIRST_FAILURE_MS, b"0"))
        except ValueError:
            failed_ms = 0
        if self.since_ms is not None and failed_ms < self.since_ms:
            return False
        return self.until_ms is None or failed_ms <= self.until_ms


@dataclass(frozen=True, slots=True)
class ReplayResult:
    scanned: int
    replayed: int


async def replay_dead_letters(
    settings: Settings, keep: ReplayFilter, progress: Callable[[str], None] = lambda _: None
) -> ReplayResult:
    """Re-publish matching dead letters (as they stood when the replay began) to their source topic."""
    reader = AIOKafkaConsumer(
        **client_options(settings), enable_auto_commit=False, group_id=None, isolation_level="read_committed"
    )
    producer = make_producer(settings)
    try:
        await reader.start()
        await producer.start()
    except (KafkaError, OSError) as exc:
        await stop_groupless(reader)
        await producer.stop()
        raise unreachable(settings, exc) from exc
    try:
        tps = await read_whole_topic(reader, settings.dlq_topic)
        if not tps:
            progress(f"no dead-letter topic {settings.dlq_topic}: nothing to replay")
            return ReplayResult(0, 0)
        # The end as the replay began: records dead-lettered meanwhile (a replay failing again) wait for
        # the next replay. Positions, not record offsets, say when a partition is done: transaction
        # markers take offsets too.
        ends = await reader.end_offsets(tps)
        publisher = KafkaPublisher(producer)
        scanned = replayed = 0
        remaining = [tp for tp in tps if await reader.position(tp) < ends[tp]]
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    scanned += 1
                    headers = {name: value for name, value in record.headers or ()}
                    if keep.matches(headers) and H_PAYLOAD_DROPPED in headers:
                        # no payload to replay: re-publishing its null value would be a tombstone
                        progress(
                            f"not replayed: dead letter {tp.partition}:{record.offset} is a reference "
                            "(its payload was too large); its cdc-original-* headers say where to re-read it"
                        )
                    elif keep.matches(headers):
                        topic = headers.get(H_ORIGINAL_TOPIC, settings.source_topic.encode()).decode()
                        stamp = [(H_REPLAYED_AT_MS, str(now_ms()).encode())]
                        await publisher.publish(topic, record.key, record.value, stamp)
                        replayed += 1
                        metrics.REPLAYED.inc()
                    if scanned % 1000 == 0:
                        progress(f"scanned {scanned} dead letters, replayed {replayed}")
            remaining = [tp for tp in remaining if await reader.position(tp) < ends[tp]]
        return ReplayResult(scanned, replayed)
    finally:
        await stop_groupless(reader)
        await producer.stop()
