"""consumer.pipeline and consumer.model_calls: a batch's texts embedded ahead (CDC_EMBED_AHEAD), while the
batch before it writes and commits.

Ahead is a guess made before the batch before has landed: it must change nothing in what lands or in
the outcomes, only spare the model calls it guessed right.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import REGISTRY

from consumer.pipeline import BatchProcessor
from consumer.settings import Settings
from tests.unit.fakes import FakeEmbedder, FakePublisher, FakeRecord, FakeSink, Topic, k, text_of, unit_vector
from tests.unit.test_pipeline_write_parts import mixed_batch, stored_first

SETTINGS = Settings(max_text_chars=1000)


async def applied(records: list[FakeRecord], ahead: bool) -> tuple[object, ...]:
    sink, topic = FakeSink(), Topic()
    await stored_first(sink, topic)
    embedder = FakeEmbedder()
    processor = BatchProcessor(SETTINGS, embedder, sink, FakePublisher())
    if ahead:
        await processor.embed_ahead(records)
        assert len(embedder.calls) == 1
    report = await processor.process(records)
    return sink.snapshot(), dict(report.outcomes), report.embedded_texts, report.written_rows, embedder


async def test_a_batch_embedded_ahead_lands_and_reports_exactly_as_one_that_was_not() -> None:
    records = mixed_batch(Topic())
    *without, plain = await applied(records, ahead=False)
    *with_ahead, early = await applied(records, ahead=True)
    assert with_ahead == without
    assert isinstance(plain, FakeEmbedder) and isinstance(early, FakeEmbedder)
    # the guess was right: the batch called the model for nothing, and it embedded what the batch would
    assert len(early.calls) == 1 and sorted(early.calls[0]) == sorted(plain.texts_seen)


async def test_what_the_batch_before_changed_is_decided_anew_when_the_batch_is_applied() -> None:
    sink, topic = FakeSink(), Topic()
    embedder = FakeEmbedder()
    processor = BatchProcessor(SETTINGS, embedder, sink, FakePublisher())
    await processor.process([topic.create(1, 10, "old"), topic.create(2, 10, "old")])
    later = [topic.update(1, 30, "same"), topic.update(2, 30, "mine")]
    await processor.embed_ahead(later)  # the table says: both texts are new
    assert sorted(embedder.calls[-1]) == sorted([text_of("same"), text_of("mine")])
    # meanwhile the batch before lands: key 1 gets the very text `later` has, key 2 another one
    await processor.process([topic.update(1, 20, "same"), topic.update(2, 20, "theirs")])
    calls = len(embedder.calls)
    report = await processor.process(later)
    assert dict(report.outcomes) == {"unchanged": 1, "embedded": 1}  # key 1 is a touch now
    assert len(embedder.calls) == calls  # key 2's vector was embedded ahead
    for key, title in ((1, "same"), (2, "mine")):
        row = sink.rows[k(key)]
        assert row.position == 30
        assert row.vector is not None and np.array_equal(row.vector, unit_vector(text_of(title)))


async def test_a_failed_guess_leaves_the_batch_to_embed_its_texts_and_handle_their_failures() -> None:
    topic = Topic()
    records = [topic.create(i, 10 + i, f"title {i}") for i in range(4)]
    embedder = FakeEmbedder(fail_texts=[text_of("title 2")])  # fails the call that has it
    sink = FakeSink()
    publisher = FakePublisher()
    processor = BatchProcessor(SETTINGS, embedder, sink, publisher)
    await processor.embed_ahead(records)  # fails: nothing is kept, nothing raised
    report = await processor.process(records)
    assert report.outcomes["embedded"] == 3 and report.embedded_texts == 3
    assert len(publisher.to(SETTINGS.retry_topic)) == 1  # title 2, narrowed text by text as always
    assert sorted(sink.rows) == [k(0), k(1), k(3)]


def unused() -> float:
    labels = {"pipeline": SETTINGS.pipeline}
    return REGISTRY.get_sample_value("cdc_embedder_texts_embedded_ahead_unused_total", labels) or 0.0


async def test_only_the_last_guess_is_kept_and_what_no_batch_took_is_counted() -> None:
    topic = Topic()
    first = [topic.create(i, 10, f"first {i}") for i in range(3)]
    second = [topic.create(i, 20, f"second {i}") for i in range(3, 6)]
    embedder = FakeEmbedder()
    processor = BatchProcessor(SETTINGS, embedder, FakeSink(), FakePublisher())
    before = unused()
    await processor.embed_ahead(first)
    await processor.embed_ahead(second)
    assert unused() - before == 3
    await processor.process(first)
    assert sorted(embedder.calls[-1]) == sorted(text_of(f"first {i}") for i in range(3))  # embedded again
    calls = len(embedder.calls)
    await processor.process(second)
    assert len(embedder.calls) == calls
