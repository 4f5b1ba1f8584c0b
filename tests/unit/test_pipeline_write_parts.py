"""consumer.pipeline: a batch written in parts, each while the model embeds the next (CDC_BATCH_WRITE_PARTS).

Parts must change nothing in what lands or in the outcomes; they only let the write run beside the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from consumer.pipeline import WRITE_PART_MIN_TEXTS, BatchProcessor, write_parts
from consumer.settings import Settings
from consumer.sink import WriteBatch, WriteResult
from tests.unit.fakes import FakeEmbedder, FakePublisher, FakeRecord, FakeSink, StuckEmbedder, Topic

N = 4 * WRITE_PART_MIN_TEXTS
WAIT_S = 10.0  # a bound on waits that only a broken overlap reaches, never a measured time


def settings(parts: int) -> Settings:
    return Settings(batch_write_parts=parts, max_text_chars=1000)


def to_embed(lengths: Sequence[int]) -> list[tuple[object, str, bytes]]:
    return [(None, "x" * n, b"") for n in lengths]


def test_parts_are_cut_by_text_length_and_never_below_the_minimum() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(N)]
    parts = write_parts(to_embed(lengths), 4)  # type: ignore[arg-type]
    assert [len(p) for p in parts] == [WRITE_PART_MIN_TEXTS] * 4
    flat = [len(t[1]) for p in parts for t in p]
    assert flat == sorted(lengths)
    assert [len(p) for p in write_parts(to_embed([5] * 40), 4)] == [20, 20]  # type: ignore[arg-type]
    assert len(write_parts(to_embed([5] * (2 * WRITE_PART_MIN_TEXTS - 1)), 4)) == 1  # type: ignore[arg-type]
    assert len(write_parts(to_embed([5] * N), 1)) == 1  # type: ignore[arg-type]
    assert write_parts([], 4) == []


def test_with_chunking_a_few_long_documents_are_parts_by_the_windows_they_fill() -> None:
    window = 8  # tokens, so a window is 32 characters (CHARS_PER_TOKEN 4)
    lengths = [32 * chunks for chunks in (1, 2, 3, 4, 6, 8, 10, 12, 14)]  # 60 windows in 9 documents
    assert len(write_parts(to_embed(lengths), 4)) == 1  # counted as texts: too few to part
    parts = write_parts(to_embed(lengths), 4, window)  # type: ignore[arg-type]
    assert [[len(t[1]) // 32 for t in p] for p in parts] == [[1, 2, 3, 4, 6, 8], [10, 12], [14]]
    assert len(write_parts(to_embed([32] * N), 4, window)) == 4  # type: ignore[arg-type]


def mixed_batch(topic: Topic) -> list[FakeRecord]:
    """Creates of texts of many lengths, a same-text update (a touch), a new-text update, deletes, and a
    create that an older change later in the batch must not beat."""
    records = [topic.create(i, 1000 + i, "t" * (i % 23 + 1), f"body {i}") for i in range(N)]
    records += [
        topic.update(100, 2000, "kept"),  # stored with this text below: a touch
        topic.update(101, 2001, "changed"),
        topic.delete(102, 2002),
        topic.create(103, 2004, "newer"),
        topic.create(103, 2003, "older"),
    ]
    return records


async def stored_first(sink: FakeSink, topic: Topic) -> None:
    seed = BatchProcessor(settings(1), FakeEmbedder(), sink, FakePublisher())
    await seed.process([topic.create(key, 10, "kept") for key in (100, 101, 102)])


async def test_a_batch_in_parts_lands_and_reports_exactly_as_one_write() -> None:
    results = []
    for parts in (1, 4):
        sink, topic = FakeSink(), Topic()
        await stored_first(sink, topic)
        processor = BatchProcessor(settings(parts), FakeEmbedder(), sink, FakePublisher())
        report = await processor.process(mixed_batch(topic))
        results.append((sink.snapshot(), dict(report.outcomes), report.embedded_texts, report.written_rows))
        writes = [len(w.rows) for w in sink.writes[1:]]  # after the seeding write
        assert len(writes) == (1 if parts == 1 else 4), writes
    assert results[0] == results[1]
    assert results[0][1] == {"embedded": N + 2, "unchanged": 1, "deleted": 1, "superseded": 1}


class OverlapSink(FakeSink):
    """Each write but the last waits for the model to start on the next part: with no overlap (the
    write awaited before the next model call) it never would, and the write fails."""

    def __init__(self, model_calls: list[list[str]]) -> None:
        super().__init__()
        self.model_calls = model_calls
        self.writes_done = 0

    async def write(self, batch: WriteBatch) -> WriteResult:
        next_part_called = self.writes_done + 2  # part n is written once part n + 1's call has started
        if next_part_called <= 4:
            deadline = time.monotonic() + WAIT_S
            while len(self.model_calls) < next_part_called:
                assert time.monotonic() < deadline, "the write never ran beside the next part's model call"
                await asyncio.sleep(0.001)
        self.writes_done += 1
        return await super().write(batch)


async def test_each_part_is_written_while_the_model_embeds_the_next() -> None:
    embedder = FakeEmbedder()
    sink = OverlapSink(embedder.calls)
    topic = Topic()
    records = [topic.create(i, 100 + i, f"title {i}", "w " * (i % 17)) for i in range(N)]
    report = await BatchProcessor(settings(4), embedder, sink, FakePublisher()).process(records)
    assert report.outcomes["embedded"] == N
    assert sink.writes_done == 4
    assert [len(c) for c in embedder.calls] == [WRITE_PART_MIN_TEXTS] * 4
    assert len(sink.rows) == N


class FailingSink(FakeSink):
    def __init__(self, fail_write: int) -> None:
        super().__init__()
        self.fail_write = fail_write

    async def write(self, batch: WriteBatch) -> WriteResult:
        if len(self.writes) + 1 == self.fail_write:
            self.fail_write = 0
            raise ConnectionError("database gone for a moment")
        return await super().write(batch)


async def test_a_batch_that_fails_between_its_parts_is_applied_again_to_the_same_end() -> None:
    """The first parts landed, a later one failed: the batch is held and applied again (as the consumer
    does), and ends as if it had been written at once."""
    expected_sink, topic = FakeSink(), Topic()
    await BatchProcessor(settings(1), FakeEmbedder(), expected_sink, FakePublisher()).process(
        records := [topic.create(i, 100 + i, f"title {i}", "w " * (i % 13)) for i in range(N)]
    )
    sink = FailingSink(fail_write=3)
    processor = BatchProcessor(settings(4), FakeEmbedder(), sink, FakePublisher())
    with pytest.raises(ConnectionError):
        await processor.process(records)
    assert 0 < len(sink.rows) < N  # the parts before the failure landed
    report = await processor.process(records)
    assert sink.snapshot() == expected_sink.snapshot()
    assert report.outcomes["embedded"] + report.outcomes["superseded"] == N


async def test_a_stuck_model_fails_the_rest_of_the_batch_without_calling_it_again() -> None:
    """Each later part would queue behind the stuck thread for the whole timeout again: a batch of four
    parts would take four timeouts, past Kafka's max.poll.interval.ms with the default."""
    embedder, publisher, stalls = StuckEmbedder(), FakePublisher(), []
    sink, topic = FakeSink(), Topic()
    processor = BatchProcessor(
        Settings(batch_write_parts=4, model_timeout_s=0.2),
        embedder,
        sink,
        publisher,
        on_model_stall=lambda: stalls.append(1),
    )
    try:
        report = await processor.process([topic.create(i, 100 + i, f"title {i}") for i in range(N)])
    finally:
        embedder.release.set()
    assert embedder.started == 1
    assert stalls == [1]
    assert report.outcomes == {"retried": N}
    assert {p.header["cdc-error-class"] for p in publisher.sent} == {b"timeout"}
    assert sink.rows == {}
