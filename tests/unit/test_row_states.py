"""BatchProcessor: the states a row's vector goes through besides embedded and deleted, with fakes.

Empty and over-long texts, TRUNCATE, snapshot rows against streamed changes, a touch that loses a
race with another member, and when outcomes are counted. The sink rule itself is held to real
Postgres by tests/integration/test_sink_contract.py and test_sink_properties.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from consumer.pipeline import BatchProcessor, BatchReport
from consumer.settings import Settings
from consumer.sink import State, WriteBatch, WriteResult, text_hash
from tests.unit.fakes import (
    MODEL,
    FakeEmbedder,
    FakePublisher,
    FakeRecord,
    FakeSink,
    Row,
    StuckEmbedder,
    Topic,
    k,
    text_of,
)


@pytest.fixture
def settings() -> Settings:
    return Settings(max_text_chars=100, model_timeout_s=0.2)


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def processor(settings: Settings, embedder: FakeEmbedder, sink: FakeSink) -> BatchProcessor:
    return BatchProcessor(settings, embedder, sink, FakePublisher())


async def apply(processor: BatchProcessor, records: Sequence[FakeRecord]) -> dict[str, int]:
    report = await processor.process(records)
    assert sum(report.outcomes.values()) == len(records), "a record without exactly one outcome"
    report.record_metrics()
    return {outcome: n for outcome, n in report.outcomes.items() if n}


def has_vector_of(sink: FakeSink, key: int, text: str) -> bool:
    row = sink.rows.get(k(key))
    return row is not None and row.vector is not None and row.text_sha256 == text_hash(MODEL, text)


# --- texts that cannot be embedded ----------------------------------------------------------------


@pytest.mark.parametrize(("title", "body"), [("", ""), ("  ", "\n"), (None, None)])
async def test_text_that_becomes_empty_removes_the_vector(
    processor: BatchProcessor, sink: FakeSink, topic_: Topic, title: str | None, body: str | None
) -> None:
    assert await apply(processor, [topic_.create(1, 10, "words")]) == {"embedded": 1}
    assert await apply(processor, [topic_.update(1, 20, title, body)]) == {"no_text": 1}  # type: ignore[arg-type]
    assert sink.rows[k(1)] == Row(None, None, 20, False, False, MODEL)
    # the row is not deleted: an older change must still lose, and new text embeds again
    assert await apply(processor, [topic_.update(1, 15, "older words")]) == {"superseded": 1}
    assert await apply(processor, [topic_.update(1, 30, "words again")]) == {"embedded": 1}
    assert has_vector_of(sink, 1, text_of("words again"))


async def test_text_over_the_limit_removes_the_vector_and_is_dead_lettered_with_the_setting(
    settings: Settings, embedder: FakeEmbedder, sink: FakeSink, topic_: Topic
) -> None:
    publisher = FakePublisher()
    processor = BatchProcessor(settings, embedder, sink, publisher)
    await apply(processor, [topic_.create(1, 10, "short")])
    assert await apply(processor, [topic_.update(1, 20, "t", "x" * 200)]) == {"dead_lettered": 1}
    assert sink.rows[k(1)].vector is None and sink.rows[k(1)].deleted is False
    (letter,) = publisher.sent
    assert letter.header["cdc-error-class"] == b"text_too_long"
    assert b"CDC_MAX_TEXT_CHARS=" in letter.header["cdc-error-message"]
    # a newer change of the key wins over it: no dead letter for a text that never got written
    assert await apply(processor, [topic_.update(1, 15, "t", "x" * 200)]) == {"superseded": 1}
    assert embedder.texts_seen == [text_of("short")]


# --- TRUNCATE --------------------------------------------------------------------------------------


async def test_truncate_removes_older_vectors_and_keeps_what_came_after(
    processor: BatchProcessor, sink: FakeSink, topic_: Topic
) -> None:
    await apply(processor, [topic_.create(1, 10, "a"), topic_.create(2, 11, "b")])
    # a row inserted after the truncate may be written first, by the member owning its partition
    await apply(processor, [topic_.create(3, 30, "after")])
    assert await apply(processor, [topic_.truncate(20)]) == {"table_cleared": 1}
    assert set(sink.rows) == {k(3)}
    # a late older event of a removed row (a retry, a redelivery) must not bring a vector back
    assert await apply(processor, [topic_.update(1, 12, "late")]) == {"superseded": 1}
    assert await apply(processor, [topic_.snapshot(2, 5, "late snapshot")]) == {"superseded": 1}
    assert await apply(processor, [topic_.create(1, 40, "new")]) == {"embedded": 1}
    assert set(sink.rows) == {k(1), k(3)}


async def test_truncate_in_a_batch_supersedes_the_changes_before_it(
    processor: BatchProcessor, embedder: FakeEmbedder, sink: FakeSink, topic_: Topic
) -> None:
    records = [topic_.create(1, 10, "gone"), topic_.truncate(20), topic_.create(2, 30, "kept")]
    assert await apply(processor, records) == {"superseded": 1, "table_cleared": 1, "embedded": 1}
    assert embedder.texts_seen == [text_of("kept")]
    assert set(sink.rows) == {k(2)}


# --- snapshots against streamed changes ------------------------------------------------------------


async def test_change_committed_after_the_snapshot_read_wins_despite_its_lower_lsn(
    processor: BatchProcessor, sink: FakeSink, topic_: Topic
) -> None:
    """A transaction open while the snapshot (at 150) read the row wrote at 100 and committed later."""
    assert await apply(processor, [topic_.snapshot(1, 150, "as the snapshot read it")]) == {"embedded": 1}
    assert await apply(processor, [topic_.update(1, 100, "committed after")]) == {"embedded": 1}
    assert has_vector_of(sink, 1, text_of("committed after"))
    # a redelivered snapshot row changes nothing now
    assert await apply(processor, [topic_.snapshot(1, 150, "as the snapshot read it")]) == {"superseded": 1}
    assert has_vector_of(sink, 1, text_of("committed after"))


async def test_in_one_batch_the_streamed_change_beats_the_snapshot_row(
    processor: BatchProcessor, sink: FakeSink, topic_: Topic
) -> None:
    records = [topic_.snapshot(1, 150, "snapshot"), topic_.update(1, 100, "streamed")]
    assert await apply(processor, records) == {"embedded": 1, "superseded": 1}
    assert has_vector_of(sink, 1, text_of("streamed"))


async def test_a_newer_snapshot_refreshes_an_older_snapshot_row_but_never_a_delete(
    processor: BatchProcessor, sink: FakeSink, topic_: Topic
) -> None:
    await apply(processor, [topic_.snapshot(1, 100, "first read")])
    assert await apply(processor, [topic_.snapshot(1, 200, "second read")]) == {"embedded": 1}
    assert await apply(processor, [topic_.snapshot(1, 150, "a late first read")]) == {"superseded": 1}
    assert has_vector_of(sink, 1, text_of("second read"))
    await apply(processor, [topic_.delete(1, 120)])  # streamed: wins over any snapshot row
    assert await apply(processor, [topic_.snapshot(1, 300, "read before the delete")]) == {"superseded": 1}
    assert sink.rows[k(1)].deleted is True


async def test_snapshot_row_replaces_a_vector_of_another_model(
    settings: Settings, sink: FakeSink, topic_: Topic
) -> None:
    sink.rows[k(1)] = Row(None, b"h", 500, False, False, "an older model")
    processor = BatchProcessor(settings, FakeEmbedder(), sink, FakePublisher())
    assert await apply(processor, [topic_.snapshot(1, 100, "backfilled")]) == {"embedded": 1}
    assert sink.rows[k(1)].model == MODEL


# --- the unchanged shortcut under concurrency ------------------------------------------------------


class RacingSink(FakeSink):
    """Another member writes key 1 with other text between this member's read and its write."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    async def stored(self, keys: Sequence[tuple[str, ...]]) -> State:
        state = await super().stored(keys)
        if not self.raced and k(1) in keys and self.rows.get(k(1)) is not None:
            self.raced = True
            self.rows[k(1)] = Row(
                None, text_hash(MODEL, text_of("other member's text")), 15, False, False, MODEL
            )
        return state


async def test_a_touch_that_loses_the_race_re_embeds_instead(settings: Settings, topic_: Topic) -> None:
    sink = RacingSink()
    embedder = FakeEmbedder()
    processor = BatchProcessor(settings, embedder, sink, FakePublisher())
    sink.raced = True
    await apply(processor, [topic_.create(1, 10, "same")])
    sink.raced = False
    # decided "unchanged" on the stored hash of "same"; the guarded touch finds another hash
    assert await apply(processor, [topic_.update(1, 20, "same")]) == {"embedded": 1}
    assert has_vector_of(sink, 1, text_of("same"))
    assert sink.rows[k(1)].position == 20
    assert embedder.texts_seen == [text_of("same"), text_of("same")]


# --- counting ---------------------------------------------------------------------------------------


def events_total(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "cdc_embedder_events_total", {"pipeline": "documents", "op": "create", "outcome": outcome}
        )
        or 0
    )


async def test_outcomes_are_counted_only_once_the_batch_is_committed(
    processor: BatchProcessor, topic_: Topic
) -> None:
    before = events_total("embedded")
    report: BatchReport = await processor.process([topic_.create(1, 10, "x")])
    assert events_total("embedded") == before  # a failed Kafka commit re-applies the batch
    report.record_metrics()
    assert events_total("embedded") == before + 1


# --- the model watchdog -----------------------------------------------------------------------------


async def test_a_stuck_model_fails_the_batch_once_and_reports_the_stall(
    settings: Settings, sink: FakeSink, topic_: Topic
) -> None:
    embedder, publisher, stalls = StuckEmbedder(), FakePublisher(), []
    processor = BatchProcessor(settings, embedder, sink, publisher, on_model_stall=lambda: stalls.append(1))
    try:
        outcome = await apply(processor, [topic_.create(1, 10, "a"), topic_.create(2, 11, "b")])
    finally:
        embedder.release.set()
    assert outcome == {"retried": 2}
    assert embedder.started == 1  # not text by text behind a call that cannot be stopped
    assert stalls == [1]
    assert {p.header["cdc-error-class"] for p in publisher.sent} == {b"timeout"}
    assert b"CDC_MODEL_TIMEOUT_S" in publisher.sent[0].header["cdc-error-message"]


@pytest.fixture
def topic_() -> Topic:
    return Topic()


def test_write_batch_counts_a_truncate() -> None:
    assert len(WriteBatch(truncate_at=5)) == 1
    assert WriteResult(frozenset()).truncated_rows == 0
