"""consumer.pipeline.BatchProcessor with in-memory fakes of the model, the vector table and the broker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from consumer.embedders.base import Embedding
from consumer.errors import ErrorClass
from consumer.events import UNAVAILABLE_PLACEHOLDER
from consumer.pipeline import BatchProcessor, BatchReport
from consumer.retry import (
    H_ATTEMPT,
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE_MS,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    Headers,
)
from consumer.settings import Settings
from consumer.sink import Kind, WriteBatch, WriteResult, text_hash
from tests.unit.fakes import (
    DLQ_TOPIC,
    MAX_ATTEMPTS,
    MODEL,
    RETRY_TOPIC,
    SOURCE_TOPIC,
    FakeEmbedder,
    FakePublisher,
    FakeRecord,
    FakeSink,
    Published,
    Row,
    Topic,
    event,
    k,
    text_of,
    unit_vector,
)

# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    return Settings(
        retry_max_attempts=MAX_ATTEMPTS,
        retry_backoff_initial_s=1.0,
        retry_backoff_max_s=10.0,
        max_text_chars=1000,
    )


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def topic() -> Topic:
    return Topic()


@pytest.fixture
def processor(
    settings: Settings, embedder: FakeEmbedder, sink: FakeSink, publisher: FakePublisher
) -> BatchProcessor:
    return BatchProcessor(settings, embedder, sink, publisher)


async def apply(processor: BatchProcessor, records: Sequence[FakeRecord]) -> BatchReport:
    report = await processor.process(records)
    assert sum(report.outcomes.values()) == len(records), "a record without exactly one outcome"
    report.record_metrics()  # as the consumer does once the batch's Kafka transaction committed
    return report


def outcomes(report: BatchReport) -> dict[str, int]:
    return {k: v for k, v in report.outcomes.items() if v}


def assert_embedded(sink: FakeSink, key: int | str, text: str, position: int) -> None:
    row = sink.rows[k(key)]
    assert row.deleted is False
    assert row.position == position
    assert row.text_sha256 == text_hash(MODEL, text)
    assert row.vector is not None
    np.testing.assert_array_equal(row.vector, unit_vector(text))


def events_total(op: str, outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "cdc_embedder_events_total", {"pipeline": "documents", "op": op, "outcome": outcome}
        )
        or 0.0
    )


# --- the cases ------------------------------------------------------------------------------------


async def test_inserts_are_embedded(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    before = events_total("create", "embedded")
    records = [topic.create(1, 100, "one"), topic.create(2, 101, "two"), topic.create("k3", 102, "three")]
    report = await apply(processor, records)
    assert outcomes(report) == {"embedded": 3}
    assert embedder.calls == [[text_of("one"), text_of("two"), text_of("three")]]
    assert report.embedded_texts == 3
    assert report.written_rows == 3
    assert_embedded(sink, 1, text_of("one"), 100)
    assert_embedded(sink, 2, text_of("two"), 101)
    assert_embedded(sink, "k3", text_of("three"), 102)
    assert publisher.sent == []
    assert events_total("create", "embedded") - before == 3


async def test_snapshot_rows_are_embedded(processor: BatchProcessor, sink: FakeSink, topic: Topic) -> None:
    report = await apply(processor, [topic.record(5, event("r", 5, 50, "snap", "shot"))])
    assert outcomes(report) == {"embedded": 1}
    assert_embedded(sink, 5, "snap\n\nshot", 50)


async def test_replaying_the_same_records_changes_nothing(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    records = [
        topic.create(1, 100, "one"),
        topic.create(2, 110, "two"),
        topic.update(1, 120, "one v2"),
        topic.delete(2, 130),
        topic.tombstone(2),
    ]
    await apply(processor, records)
    state, calls = sink.snapshot(), len(embedder.calls)
    assert sink.rows[k(2)].deleted is True

    for _ in range(2):
        report = await apply(processor, records)
        assert outcomes(report) == {"superseded": 4, "ignored": 1}
        assert report.written_rows == 0
        assert report.embedded_texts == 0
    assert len(embedder.calls) == calls
    assert sink.snapshot() == state
    assert publisher.sent == []


async def test_an_older_change_never_overwrites_a_newer_one(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.update(1, 200, "new")])
    report = await apply(processor, [topic.create(1, 100, "old")])
    assert outcomes(report) == {"superseded": 1}
    assert embedder.texts_seen == [text_of("new")]
    assert_embedded(sink, 1, text_of("new"), 200)


async def test_older_change_later_in_the_same_batch_loses(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    report = await apply(processor, [topic.update(1, 200, "new"), topic.create(1, 100, "old")])
    assert outcomes(report) == {"embedded": 1, "superseded": 1}
    assert embedder.calls == [[text_of("new")]]
    assert_embedded(sink, 1, text_of("new"), 200)


async def test_delete_then_a_late_older_create_does_not_resurrect(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    assert outcomes(await apply(processor, [topic.create(1, 100, "doc")])) == {"embedded": 1}
    assert outcomes(await apply(processor, [topic.delete(1, 300), topic.tombstone(1)])) == {
        "deleted": 1,
        "ignored": 1,
    }
    assert sink.rows[k(1)] == Row(None, None, 300, True)
    calls = len(embedder.calls)

    report = await apply(processor, [topic.update(1, 200, "doc edited before the delete")])
    assert outcomes(report) == {"superseded": 1}
    assert len(embedder.calls) == calls
    assert sink.rows[k(1)] == Row(None, None, 300, True)


async def test_delete_of_a_never_embedded_row_leaves_a_tombstone(
    processor: BatchProcessor, sink: FakeSink, topic: Topic
) -> None:
    assert outcomes(await apply(processor, [topic.delete(9, 500)])) == {"deleted": 1}
    assert sink.rows[k(9)] == Row(None, None, 500, True)
    assert outcomes(await apply(processor, [topic.create(9, 400, "late")])) == {"superseded": 1}
    assert sink.rows[k(9)].deleted is True


async def test_recreate_after_delete_is_embedded_again(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "same")])
    await apply(processor, [topic.delete(1, 200)])
    report = await apply(processor, [topic.create(1, 300, "same")])
    assert outcomes(report) == {"embedded": 1}  # the tombstone has no text hash: no "unchanged" shortcut
    assert embedder.texts_seen == [text_of("same"), text_of("same")]
    assert_embedded(sink, 1, text_of("same"), 300)


async def test_delete_and_recreate_in_one_batch(
    processor: BatchProcessor, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "v1")])
    report = await apply(processor, [topic.delete(1, 200), topic.tombstone(1), topic.create(1, 300, "v2")])
    assert outcomes(report) == {"superseded": 1, "ignored": 1, "embedded": 1}
    assert_embedded(sink, 1, text_of("v2"), 300)


async def test_update_with_the_same_text_skips_the_model(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "title", "body")])
    vector = sink.rows[k(1)].vector
    before = events_total("update", "unchanged")

    report = await apply(processor, [topic.update(1, 150, "title", "body")])
    assert outcomes(report) == {"unchanged": 1}
    assert len(embedder.calls) == 1
    assert report.written_rows == 1
    [touch] = sink.writes[-1].rows
    assert (touch.key, touch.kind, touch.position, touch.digest) == (
        k(1),
        Kind.TOUCH,
        150,
        text_hash(MODEL, text_of("title")),
    )
    assert_embedded(sink, 1, text_of("title"), 150)  # position advanced
    assert sink.rows[k(1)].vector is vector
    assert events_total("update", "unchanged") - before == 1


async def test_update_with_new_text_is_embedded(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "title")])
    report = await apply(processor, [topic.update(1, 150, "title edited")])
    assert outcomes(report) == {"embedded": 1}
    assert embedder.calls[-1] == [text_of("title edited")]
    assert_embedded(sink, 1, text_of("title edited"), 150)


async def test_several_changes_of_one_key_embed_only_the_newest(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    records = [
        topic.create(1, 100, "v1"),
        topic.update(1, 200, "v2"),
        topic.create(2, 150, "other"),
        topic.update(1, 300, "v3"),
        topic.update(1, 250, "v2.5"),  # arrives last, but is older than v3
    ]
    report = await apply(processor, records)
    assert outcomes(report) == {"embedded": 2, "superseded": 3}
    assert embedder.calls == [[text_of("v3"), text_of("other")]]
    assert_embedded(sink, 1, text_of("v3"), 300)
    assert_embedded(sink, 2, text_of("other"), 150)


@pytest.mark.parametrize(
    ("key", "value", "error_class", "op"),
    [
        (1, b"\x00\x00\x00\x00\x02\xff garbage", ErrorClass.INVALID_JSON, "unknown"),
        (1, b'{"op": "c", "after": {', ErrorClass.INVALID_JSON, "unknown"),
        (1, event("x", 1, 10, "t", "b"), ErrorClass.UNKNOWN_OPERATION, "unknown"),
        (None, event("c", 1, 10, "t", "b"), ErrorClass.INVALID_EVENT, "create"),
        (1, b"[1, 2, 3]", ErrorClass.INVALID_EVENT, "unknown"),
        (
            1,
            orjson.dumps({"op": "c", "after": {"id": 1, "title": "t"}, "source": {"lsn": 10}}),
            ErrorClass.MISSING_TEXT,
            "create",
        ),
    ],
    ids=[
        "garbage",
        "invalid-json",
        "unknown-op",
        "no-key",
        "not-object",
        "missing-column",
    ],
)
async def test_bad_records_are_dead_lettered_and_the_rest_embedded(
    processor: BatchProcessor,
    embedder: FakeEmbedder,
    sink: FakeSink,
    publisher: FakePublisher,
    topic: Topic,
    key: int | None,
    value: bytes,
    error_class: ErrorClass,
    op: str,
) -> None:
    before = events_total(op, "dead_lettered")
    good_first = topic.create(10, 100, "first")
    bad = topic.record(key, value)
    good_last = topic.create(11, 101, "last")
    report = await apply(processor, [good_first, bad, good_last])

    assert outcomes(report) == {"embedded": 2, "dead_lettered": 1}
    assert embedder.calls == [[text_of("first"), text_of("last")]]
    assert set(sink.rows) == {k(10), k(11)}
    assert len(publisher.sent) == 1
    sent = publisher.sent[0]
    assert (sent.topic, sent.key, sent.value) == (DLQ_TOPIC, bad.key, bad.value)  # bytes unchanged
    assert sent.header[H_ERROR_CLASS] == error_class.value.encode()
    assert sent.header[H_ATTEMPT] == b"1"
    assert sent.header[H_ORIGINAL_TOPIC] == SOURCE_TOPIC.encode()
    assert sent.header[H_ORIGINAL_PARTITION] == b"0"
    assert sent.header[H_ORIGINAL_OFFSET] == str(bad.offset).encode()
    [(pipeline, failure, route)] = report.failures
    assert pipeline == "documents"
    assert failure.error_class is error_class
    assert route.dead_letter is True
    assert events_total(op, "dead_lettered") - before == 1


async def test_embedder_failing_for_one_text_retries_only_that_record(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    embedder = FakeEmbedder(fail_texts=[text_of("poison")])
    processor = BatchProcessor(settings, embedder, sink, publisher)
    records = [topic.create(1, 100, "fine"), topic.create(2, 101, "poison"), topic.create(3, 102, "ok")]
    report = await apply(processor, records)

    assert outcomes(report) == {"embedded": 2, "retried": 1}
    # the batch fails as a whole, then text by text
    assert embedder.calls == [
        [text_of("fine"), text_of("poison"), text_of("ok")],
        [text_of("fine")],
        [text_of("poison")],
        [text_of("ok")],
    ]
    assert report.embedded_texts == 2
    assert set(sink.rows) == {k(1), k(3)}
    [sent] = publisher.sent
    assert (sent.topic, sent.key, sent.value) == (RETRY_TOPIC, records[1].key, records[1].value)
    assert sent.header[H_ERROR_CLASS] == b"model_error"
    assert sent.header[H_ATTEMPT] == b"1"
    assert sent.header[H_ERROR_MESSAGE].startswith(b"ValueError: cannot embed")
    assert sent.header[H_ORIGINAL_OFFSET] == b"1"


async def test_out_of_memory_is_its_own_transient_class(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    class OutOfMemory(FakeEmbedder):
        def embed(self, texts: Sequence[str]) -> Embedding:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    processor = BatchProcessor(settings, OutOfMemory(), sink, publisher)
    report = await apply(processor, [topic.create(1, 100, "big")])
    assert outcomes(report) == {"retried": 1}
    assert publisher.sent[0].header[H_ERROR_CLASS] == b"model_out_of_memory"


async def test_embedder_failing_once_recovers_text_by_text(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    embedder = FakeEmbedder(fail_first_calls=1)
    processor = BatchProcessor(settings, embedder, sink, publisher)
    report = await apply(processor, [topic.create(1, 100, "a"), topic.create(2, 101, "b")])
    assert outcomes(report) == {"embedded": 2}
    assert embedder.calls == [[text_of("a"), text_of("b")], [text_of("a")], [text_of("b")]]
    assert publisher.sent == []
    assert_embedded(sink, 1, text_of("a"), 100)
    assert_embedded(sink, 2, text_of("b"), 101)


def from_retry_topic(sent: Published, offset: int) -> FakeRecord:
    assert sent.topic == RETRY_TOPIC
    return FakeRecord(RETRY_TOPIC, 0, offset, sent.key, sent.value, tuple(sent.headers))


async def test_failing_n_times_then_succeeding_goes_through_the_retry_topic(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    embedder = FakeEmbedder(fail_first_calls=4)  # batch + 1 text, then batch of 1 again, twice
    processor = BatchProcessor(settings, embedder, sink, publisher)
    original = topic.create(7, 700, "flaky")

    assert outcomes(await apply(processor, [original])) == {"retried": 1}
    assert outcomes(await apply(processor, [from_retry_topic(publisher.sent[0], 0)])) == {"retried": 1}
    assert [p.header[H_ATTEMPT] for p in publisher.sent] == [b"1", b"2"]
    assert publisher.sent[1].header[H_FIRST_FAILURE_MS] == publisher.sent[0].header[H_FIRST_FAILURE_MS]
    assert k(7) not in sink.rows

    report = await apply(processor, [from_retry_topic(publisher.sent[1], 1)])
    assert outcomes(report) == {"embedded": 1}
    assert len(publisher.sent) == 2
    assert_embedded(sink, 7, text_of("flaky"), 700)


async def test_record_at_its_last_attempt_goes_to_the_dlq(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    embedder = FakeEmbedder(fail_texts=[text_of("doomed")])
    processor = BatchProcessor(settings, embedder, sink, publisher)
    original = topic.create(4, 400, "doomed")
    headers: Headers = [
        (H_ATTEMPT, str(MAX_ATTEMPTS - 1).encode()),
        (H_FIRST_FAILURE_MS, b"1718000000000"),
        ("cdc-not-before-ms", b"1718000004000"),
        (H_ERROR_CLASS, b"model_error"),
        (H_ORIGINAL_TOPIC, SOURCE_TOPIC.encode()),
        (H_ORIGINAL_PARTITION, b"0"),
        (H_ORIGINAL_OFFSET, str(original.offset).encode()),
    ]
    retried = FakeRecord(RETRY_TOPIC, 2, 55, original.key, original.value, tuple(headers))
    report = await apply(processor, [retried, topic.create(5, 401, "fine")])

    assert outcomes(report) == {"embedded": 1, "dead_lettered": 1}
    [sent] = publisher.sent
    assert (sent.topic, sent.key, sent.value) == (DLQ_TOPIC, original.key, original.value)
    assert sent.header[H_ATTEMPT] == str(MAX_ATTEMPTS).encode()
    assert sent.header[H_FIRST_FAILURE_MS] == b"1718000000000"
    assert sent.header[H_ORIGINAL_TOPIC] == SOURCE_TOPIC.encode()
    assert sent.header[H_ORIGINAL_PARTITION] == b"0"
    assert sent.header[H_ORIGINAL_OFFSET] == str(original.offset).encode()
    assert k(4) not in sink.rows


async def test_retried_record_superseded_by_a_newer_change_is_dropped(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    await apply(processor, [topic.update(1, 900, "newest")])
    stale = topic.create(1, 800, "stale")
    headers = [
        (H_ATTEMPT, b"1"),
        (H_ORIGINAL_TOPIC, SOURCE_TOPIC.encode()),
        (H_ORIGINAL_PARTITION, b"0"),
        (H_ORIGINAL_OFFSET, str(stale.offset).encode()),
    ]
    report = await apply(processor, [FakeRecord(RETRY_TOPIC, 0, 0, stale.key, stale.value, tuple(headers))])
    assert outcomes(report) == {"superseded": 1}
    assert publisher.sent == []
    assert_embedded(sink, 1, text_of("newest"), 900)


# --- TOAST ----------------------------------------------------------------------------------------


async def test_toast_placeholder_reads_the_text_from_the_source_table(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "title", "long body")])
    sink.source_rows[k(1)] = {"title": "new title", "body": "long body"}
    report = await apply(processor, [topic.update(1, 200, "new title", UNAVAILABLE_PLACEHOLDER)])
    assert outcomes(report) == {"embedded": 1}
    assert sink.text_calls[-1] == [k(1)]
    assert embedder.calls[-1] == ["new title\n\nlong body"]
    assert_embedded(sink, 1, "new title\n\nlong body", 200)


async def test_toast_with_unchanged_source_text_is_unchanged(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 100, "title", "long body")])
    sink.source_rows[k(1)] = {"title": "title", "body": "long body"}
    report = await apply(processor, [topic.update(1, 200, UNAVAILABLE_PLACEHOLDER, "long body")])
    assert outcomes(report) == {"unchanged": 1}
    assert len(embedder.calls) == 1
    assert sink.rows[k(1)].position == 200


async def test_toast_for_a_row_gone_from_the_source_is_superseded(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic: Topic
) -> None:
    report = await apply(processor, [topic.update(3, 300, "t", UNAVAILABLE_PLACEHOLDER)])
    assert outcomes(report) == {"superseded": 1}
    assert sink.text_calls == [[k(3)]]
    assert embedder.calls == []
    assert k(3) not in sink.rows


async def test_toast_for_an_older_change_is_not_looked_up(
    processor: BatchProcessor, sink: FakeSink, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 500, "current")])
    sink.source_rows[k(1)] = {"title": "current", "body": "body"}
    report = await apply(processor, [topic.update(1, 400, "t", UNAVAILABLE_PLACEHOLDER)])
    assert outcomes(report) == {"superseded": 1}
    assert sink.text_calls[-1] == []


async def test_toast_with_empty_source_text_clears_the_vector(
    processor: BatchProcessor, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    await apply(processor, [topic.create(1, 50, "had text")])
    sink.source_rows[k(1)] = {"title": "", "body": None}
    report = await apply(processor, [topic.update(1, 100, "", UNAVAILABLE_PLACEHOLDER)])
    assert outcomes(report) == {"no_text": 1}
    assert publisher.sent == []
    assert sink.rows[k(1)] == Row(None, None, 100, False, False, MODEL)


async def test_toast_text_over_the_limit_clears_the_vector(
    processor: BatchProcessor, sink: FakeSink, topic: Topic
) -> None:
    """The limit applies to the text read back from the source as to the text in the event."""
    await apply(processor, [topic.create(1, 50, "short")])
    sink.source_rows[k(1)] = {"title": "t", "body": "x" * 2000}
    report = await apply(processor, [topic.update(1, 100, "t", UNAVAILABLE_PLACEHOLDER)])
    assert outcomes(report) == {"dead_lettered": 1}
    assert sink.rows[k(1)].vector is None and sink.rows[k(1)].position == 100


# --- every record ends in exactly one outcome -----------------------------------------------------


async def test_mixed_batch_accounts_for_every_record(
    settings: Settings, sink: FakeSink, publisher: FakePublisher, topic: Topic
) -> None:
    embedder = FakeEmbedder(fail_texts=[text_of("poison")])
    processor = BatchProcessor(settings, embedder, sink, publisher)
    await apply(processor, [topic.create(1, 10, "kept"), topic.create(2, 11, "to delete")])
    sink.source_rows[k(6)] = {"title": "toasted", "body": "from source"}

    records = [
        topic.update(1, 20, "kept"),  # unchanged
        topic.delete(2, 21),  # deleted
        topic.tombstone(2),  # ignored
        topic.create(3, 22, "v1"),  # superseded by the next
        topic.update(3, 23, "v2"),  # embedded
        topic.create(4, 24, "poison"),  # retried
        topic.record(5, b"\xde\xad\xbe\xef"),  # dead-lettered
        topic.update(6, 25, "t", UNAVAILABLE_PLACEHOLDER),  # embedded from the source text
        topic.create(1, 5, "ancient"),  # superseded by the table
    ]
    report = await apply(processor, records)
    assert outcomes(report) == {
        "unchanged": 1,
        "deleted": 1,
        "ignored": 1,
        "superseded": 2,
        "embedded": 2,
        "retried": 1,
        "dead_lettered": 1,
    }
    assert sorted(p.topic for p in publisher.sent) == [DLQ_TOPIC, RETRY_TOPIC]
    assert_embedded(sink, 3, text_of("v2"), 23)
    assert_embedded(sink, 6, "toasted\n\nfrom source", 25)
    assert sink.rows[k(2)] == Row(None, None, 21, True)
    assert sink.rows[k(1)].position == 20
    assert k(4) not in sink.rows and k(5) not in sink.rows


async def test_empty_batch(processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink) -> None:
    report = await apply(processor, [])
    assert outcomes(report) == {}
    assert embedder.calls == []
    assert report.written_rows == 0


async def test_dead_letter_routes_one_record(
    processor: BatchProcessor, publisher: FakePublisher, topic: Topic
) -> None:
    record = topic.create(1, 100, "breaks the statement")
    report = await processor.dead_letter(record, ErrorClass.DATABASE_REJECTED, "value too long")
    assert outcomes(report) == {"dead_lettered": 1}
    [sent] = publisher.sent
    assert (sent.topic, sent.value) == (DLQ_TOPIC, record.value)
    assert sent.header[H_ERROR_CLASS] == b"database_rejected"
    assert sent.header[H_ERROR_MESSAGE] == b"value too long"


async def test_database_outage_propagates_without_publishing(
    settings: Settings, embedder: FakeEmbedder, publisher: FakePublisher, topic: Topic
) -> None:
    class DownSink(FakeSink):
        async def write(self, batch: WriteBatch) -> WriteResult:
            raise ConnectionRefusedError("postgres is down")

    bad = topic.record(2, b"garbage")
    counted = {o: events_total("create", o) for o in ("embedded", "superseded")}
    with pytest.raises(ConnectionRefusedError):
        await BatchProcessor(settings, embedder, DownSink(), publisher).process(
            [topic.create(1, 100, "x"), topic.create(1, 90, "older"), bad]
        )
    assert publisher.sent == []  # nothing acknowledged: the caller holds and re-applies the batch
    # nor counted: the re-applied batch counts its outcomes once
    assert {o: events_total("create", o) for o in counted} == counted


def histogram(name: str) -> tuple[float, float]:
    """(count, sum) of a histogram so far."""
    return (
        REGISTRY.get_sample_value(f"{name}_count", {"pipeline": "documents"}) or 0.0,
        REGISTRY.get_sample_value(f"{name}_sum", {"pipeline": "documents"}) or 0.0,
    )


async def test_capture_time_is_observed_for_source_records_only(
    processor: BatchProcessor, topic: Topic
) -> None:
    """Capture = the Kafka record's timestamp minus the source commit; a retry record's timestamp is
    when it was republished, so it says nothing about capture and is left out (end to end is not)."""
    source_ms = 1_700_000_000_000
    captured = replace(topic.record(1, event("c", 1, 100, "a", ts_ms=source_ms)), timestamp=source_ms + 250)
    retried = FakeRecord(
        RETRY_TOPIC,
        0,
        0,
        orjson.dumps({"id": 2}),
        event("c", 2, 101, "b", ts_ms=source_ms),
        (),
        source_ms + 9000,
    )
    capture, end_to_end = (
        histogram("cdc_embedder_capture_seconds"),
        histogram("cdc_embedder_end_to_end_seconds"),
    )
    await apply(processor, [captured, retried])
    capture_now = histogram("cdc_embedder_capture_seconds")
    assert capture_now[0] - capture[0] == 1
    assert capture_now[1] - capture[1] == pytest.approx(0.25)
    assert histogram("cdc_embedder_end_to_end_seconds")[0] - end_to_end[0] == 2
