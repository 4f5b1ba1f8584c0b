"""consumer.app.EmbeddingConsumer: a batch is embedded while the previous one is written and committed,
unless the two share a key. In-memory fakes of the broker client and producer; no I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from aiokafka import ConsumerRecord, TopicPartition

from consumer.app import EmbeddingConsumer
from consumer.embedder import Embedding
from consumer.events import Key
from consumer.health import HealthState
from consumer.pipeline import BatchProcessor
from consumer.settings import Settings
from consumer.sink import Stored, WriteBatch, text_hash
from tests.unit.fakes import (
    MODEL,
    SOURCE_TOPIC,
    FakeEmbedder,
    FakePublisher,
    FakeSink,
    Row,
    Topic,
    unit_vector,
)

TP = TopicPartition(SOURCE_TOPIC, 0)


class FakeKafka:
    """The consumer client: hands out the batches offered to it, one per fetch."""

    def __init__(self) -> None:
        self.offered: asyncio.Queue[list[ConsumerRecord[bytes, bytes]]] = asyncio.Queue()

    def offer(self, records: Sequence[Any]) -> None:
        self.offered.put_nowait(
            [
                ConsumerRecord(r.topic, r.partition, r.offset, 0, 0, r.key, r.value, None, 0, 0, ())
                for r in records
            ]
        )

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        try:
            return {TP: await asyncio.wait_for(self.offered.get(), timeout_ms / 1000)}
        except TimeoutError:
            return {}

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def paused(self) -> set[TopicPartition]:
        return set()


class FakeProducer:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield
        self.log.append("commit")

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group: str) -> None:
        self.log.append(f"offsets {offsets[TP]}")


class LoggingEmbedder(FakeEmbedder):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def embed(self, texts: Sequence[str]) -> Embedding:
        self.log.append(f"embed {' '.join(t.split()[0] for t in texts)}")
        return super().embed(texts)


class SlowSink(FakeSink):
    """Writes take a while, so a batch that overlaps one shows it in the log."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.writing: asyncio.Queue[None] = asyncio.Queue()

    async def stored(self, keys: Sequence[Key]) -> dict[Key, Stored]:
        self.log.append(f"lookup {keys}")
        return await super().stored(keys)

    async def write(self, batch: WriteBatch) -> int:
        self.log.append("write")
        self.writing.put_nowait(None)
        await asyncio.sleep(0.3)
        self.log.append("written")
        return await super().write(batch)


async def run_batches(
    *batches: Sequence[Any], stored: dict[Key, Row] | None = None
) -> tuple[list[str], SlowSink]:
    """Run the consumer loop over `batches`, each offered while the previous one is being written."""
    log: list[str] = []
    settings = Settings()
    sink = SlowSink(log)
    sink.rows.update(stored or {})
    processor = BatchProcessor(settings, LoggingEmbedder(log), sink, FakePublisher())
    kafka = FakeKafka()
    consumer = EmbeddingConsumer(
        settings,
        kafka,
        FakeProducer(log),
        processor,
        sink,
        HealthState(60),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    for batch in batches:
        kafka.offer(batch)
        await asyncio.wait_for(sink.writing.get(), 5)  # the next batch arrives during this one's write
    stop.set()
    await asyncio.wait_for(running, 5)
    return log, sink


async def test_a_batch_is_embedded_while_the_previous_one_is_written() -> None:
    topic = Topic()
    log, sink = await run_batches([topic.create(1, 10, "first")], [topic.create(2, 20, "second")])
    assert log.index("embed second") < log.index("written")
    after = ["written", "offsets 1", "commit", "write", "written", "offsets 2", "commit"]
    assert log[log.index("written") :] == after
    assert set(sink.rows) == {1, 2}


async def test_a_batch_sharing_a_key_waits_for_the_previous_write() -> None:
    """Stored text A, changed to B in one batch and back to A in the next: the second batch's lookup must
    see B, or it would find A stored, skip the model, and leave B's vector on a row whose text is A."""
    topic, a = Topic(), "A\n\nbody"
    stored = Row(unit_vector(a), text_hash(MODEL, a), 5, False)
    log, sink = await run_batches([topic.update(1, 10, "B")], [topic.update(1, 20, "A")], stored={1: stored})
    row = sink.rows[1]
    assert (row.text_sha256, row.position) == (text_hash(MODEL, a), 20)
    assert row.vector is not None
    np.testing.assert_array_equal(row.vector, unit_vector(a))
    assert "lookup [1]" in log[log.index("commit") :]  # the lookup waited for the commit
