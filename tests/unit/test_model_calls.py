"""consumer.model_calls through the BatchProcessor: rows of one text (a template, a placeholder) cost the
model one text, and each row still gets its own outcome."""

from __future__ import annotations

import numpy as np

from consumer.pipeline import BatchProcessor
from consumer.settings import Settings
from tests.unit.fakes import FakeEmbedder, FakePublisher, FakeSink, Topic, k, text_of, unit_vector

SETTINGS = Settings(max_text_chars=1000)


def assert_vector(sink: FakeSink, key: int, text: str) -> None:
    row = sink.rows[k(key)]
    assert row.vector is not None and np.array_equal(row.vector, unit_vector(text))


async def test_a_text_on_several_rows_of_a_batch_is_embedded_once_and_written_to_each() -> None:
    topic, sink, embedder = Topic(), FakeSink(), FakeEmbedder()
    processor = BatchProcessor(SETTINGS, embedder, sink, FakePublisher())
    records = [topic.create(key, 10 + key, "template") for key in (1, 2, 3)]
    records.insert(1, topic.create(4, 14, "other"))
    report = await processor.process(records)
    assert embedder.calls == [[text_of("template"), text_of("other")]]
    assert dict(report.outcomes) == {"embedded": 4}
    assert report.embedded_texts == 2 and report.written_rows == 4
    for key in (1, 2, 3):
        assert_vector(sink, key, text_of("template"))
    assert_vector(sink, 4, text_of("other"))


async def test_a_failing_text_on_several_rows_fails_each_of_them() -> None:
    topic, sink, publisher = Topic(), FakeSink(), FakePublisher()
    embedder = FakeEmbedder(fail_texts=[text_of("poison")])
    processor = BatchProcessor(SETTINGS, embedder, sink, publisher)
    records = [topic.create(1, 11, "poison"), topic.create(2, 12, "fine"), topic.create(3, 13, "poison")]
    report = await processor.process(records)
    assert dict(report.outcomes) == {"embedded": 1, "retried": 2}
    retried = publisher.to(SETTINGS.retry_topic)
    assert sorted(p.key for p in retried) == sorted([records[0].key, records[2].key])
    assert sorted(sink.rows) == [k(2)]
    # narrowed text by text after the batch failed: the poison once, not once per row
    assert embedder.calls[1:] == [[text_of("poison")], [text_of("fine")]]


async def test_a_text_on_several_rows_embedded_ahead_serves_every_row() -> None:
    topic, sink, embedder = Topic(), FakeSink(), FakeEmbedder()
    processor = BatchProcessor(SETTINGS, embedder, sink, FakePublisher())
    records = [topic.create(key, 10 + key, "template") for key in (1, 2, 3)]
    await processor.embed_ahead(records)
    assert embedder.calls == [[text_of("template")]]
    report = await processor.process(records)
    assert len(embedder.calls) == 1  # no row went to the model again
    assert dict(report.outcomes) == {"embedded": 3}
    for key in (1, 2, 3):
        assert_vector(sink, key, text_of("template"))
