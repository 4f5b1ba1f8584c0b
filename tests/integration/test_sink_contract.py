"""The sink's contract, held by the in-memory fake of the unit tests and by real pgvector alike.

Every case runs against both, for every key type, so the fake cannot drift from the SQL it stands in
for: a case that passes on one and fails on the other is a bug in one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from consumer.embedders.base import Chunk
from consumer.settings import Settings
from consumer.sink import Kind, Stored, Write, WriteBatch, text_hash
from consumer.stack import LocalStack
from tests.integration.sink_under_test import FakeUnderTest, SinkUnderTest, postgres_sink
from tests.key_types import KEY_TYPES, KeyType
from tests.unit.fakes import MODEL, unit_vector

pytestmark = pytest.mark.integration


@pytest.fixture(params=sorted(KEY_TYPES))
def key_type(request: pytest.FixtureRequest) -> KeyType:
    return KEY_TYPES[request.param]


@pytest.fixture(params=["fake", "postgres"])
async def under_test(
    request: pytest.FixtureRequest, key_type: KeyType, stack: LocalStack, settings: Settings
) -> AsyncIterator[SinkUnderTest]:
    if request.param == "fake":
        yield FakeUnderTest(key_type)
        return
    async with postgres_sink(settings, key_type, "contract") as real:
        yield real


@pytest.fixture(params=["fake", "postgres"])
async def chunked(
    request: pytest.FixtureRequest, key_type: KeyType, stack: LocalStack, settings: Settings
) -> AsyncIterator[SinkUnderTest]:
    """The sink of a chunked pipeline (CDC_CHUNKING=chunk)."""
    if request.param == "fake":
        yield FakeUnderTest(key_type)
        return
    async with postgres_sink(settings, key_type, "chunked", chunking="chunk") as real:
        yield real


class Rows:
    """Writes of rows 1, 2, ... of one key type, by what they are."""

    def __init__(self, key_type: KeyType) -> None:
        self.kt = key_type

    def vector(self, n: int, text: str, position: int, snapshot: bool = False) -> Write:
        key = self.kt.key_of(n)
        return Write(key, Kind.VECTOR, position, snapshot, None, text_hash(MODEL, text), unit_vector(text))

    def chunked(self, n: int, chunks: list[str], position: int) -> Write:
        text = " ".join(chunks)
        pieces = tuple(Chunk(c, unit_vector(c)) for c in chunks)
        return Write(
            self.kt.key_of(n),
            Kind.VECTOR,
            position,
            False,
            None,
            text_hash(MODEL, text),
            unit_vector(text),
            pieces,
        )

    def touch(self, n: int, text: str, position: int, snapshot: bool = False) -> Write:
        return Write(self.kt.key_of(n), Kind.TOUCH, position, snapshot, None, text_hash(MODEL, text))

    def cleared(self, n: int, position: int) -> Write:
        return Write(self.kt.key_of(n), Kind.CLEARED, position, False, None)

    def deleted(self, n: int, position: int) -> Write:
        return Write(self.kt.key_of(n), Kind.DELETED, position, False, None)


async def lands(under_test: SinkUnderTest, *writes: Write) -> set[int]:
    """Which of the writes landed, by row number (the writes' keys are distinct)."""
    result = await under_test.sink.write(WriteBatch(list(writes)))
    return {i for i, w in enumerate(writes) if w.key in result.landed}


async def stored(under_test: SinkUnderTest, kt: KeyType, n: int) -> Stored | None:
    state = await under_test.sink.stored([kt.key_of(n)])
    return state.rows.get(kt.key_of(n))


async def test_a_write_lands_once_and_reads_back_under_the_same_key(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    assert await lands(under_test, rows.vector(1, "one", 10), rows.vector(2, "two", 11)) == {0, 1}
    assert await lands(under_test, rows.vector(1, "one", 10)) == set()  # a replay changes nothing
    state = await under_test.sink.stored([key_type.key_of(1), key_type.key_of(2), key_type.key_of(3)])
    assert state.rows == {
        key_type.key_of(1): Stored(text_hash(MODEL, "one"), 10, False, False, MODEL),
        key_type.key_of(2): Stored(text_hash(MODEL, "two"), 11, False, False, MODEL),
    }
    assert state.truncated_at == 0


async def test_an_older_change_never_overwrites_a_newer_one(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "new", 20))
    assert await lands(under_test, rows.vector(1, "old", 10)) == set()
    assert await lands(under_test, rows.deleted(1, 15)) == set()
    assert await lands(under_test, rows.cleared(1, 15)) == set()
    assert (await stored(under_test, key_type, 1)) == Stored(text_hash(MODEL, "new"), 20, False, False, MODEL)


async def test_a_tombstone_blocks_older_changes_and_a_newer_one_recreates(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "doc", 10))
    assert await lands(under_test, rows.deleted(1, 20)) == {0}
    assert await stored(under_test, key_type, 1) == Stored(None, 20, True, False, None)
    assert (
        await lands(
            under_test,
            rows.vector(1, "doc", 15),
        )
        == set()
    )
    assert await lands(under_test, rows.touch(1, "doc", 25)) == set()  # a tombstone has no text to keep
    assert await lands(under_test, rows.vector(1, "doc again", 30)) == {0}


async def test_a_touch_lands_only_on_the_hash_it_was_decided_on(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "same", 10), rows.vector(2, "same", 10))
    assert await lands(under_test, rows.touch(1, "same", 20), rows.touch(2, "other text", 20)) == {0}
    assert (await stored(under_test, key_type, 1)) == Stored(
        text_hash(MODEL, "same"), 20, False, False, MODEL
    )
    assert (await stored(under_test, key_type, 2)).position == 10  # type: ignore[union-attr]
    assert await lands(under_test, rows.touch(1, "same", 20)) == set()  # not newer
    assert await lands(under_test, rows.touch(3, "never written", 20)) == set()


async def test_a_cleared_row_has_no_vector_but_keeps_its_position(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "text", 10))
    assert await lands(under_test, rows.cleared(1, 20)) == {0}
    assert await stored(under_test, key_type, 1) == Stored(None, 20, False, False, MODEL)
    assert await lands(under_test, rows.vector(1, "older text", 15)) == set()


async def test_snapshot_rows_fill_gaps_and_never_beat_a_streamed_change(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    assert await lands(under_test, rows.vector(1, "read", 150, snapshot=True)) == {0}
    # committed after the snapshot read the row, at a lower LSN: it wins
    assert await lands(under_test, rows.vector(1, "streamed", 100)) == {0}
    assert await lands(under_test, rows.vector(1, "read", 150, snapshot=True)) == set()
    assert await lands(under_test, rows.touch(1, "streamed", 160, snapshot=True)) == set()
    # snapshot over snapshot: by position
    await lands(under_test, rows.vector(2, "first read", 100, snapshot=True))
    assert await lands(under_test, rows.vector(2, "late first read", 90, snapshot=True)) == set()
    assert await lands(under_test, rows.touch(2, "first read", 200, snapshot=True)) == {0}
    assert await stored(under_test, key_type, 2) == Stored(
        text_hash(MODEL, "first read"), 200, False, True, MODEL
    )
    # never over a tombstone, whatever its position
    await lands(under_test, rows.deleted(3, 50))
    assert await lands(under_test, rows.vector(3, "read before the delete", 300, snapshot=True)) == set()


async def test_a_snapshot_row_replaces_a_vector_of_another_model(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "text", 500))
    under_test.set_model(1, "an older model")
    assert await lands(under_test, rows.touch(1, "text", 600)) == set()  # the hash is the model's
    assert await lands(under_test, rows.vector(1, "text", 100, snapshot=True)) == {0}
    assert (await stored(under_test, key_type, 1)).model == MODEL  # type: ignore[union-attr]


async def test_truncate_removes_older_rows_and_sets_a_floor(
    under_test: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(under_test, rows.vector(1, "a", 10), rows.deleted(2, 11), rows.vector(3, "after", 30))
    result = await under_test.sink.write(WriteBatch([rows.vector(4, "with it", 40)], truncate_at=20))
    assert result.truncated_rows == 2 and result.landed == frozenset({key_type.key_of(4)})
    state = await under_test.sink.stored([key_type.key_of(n) for n in (1, 2, 3, 4)])
    assert set(state.rows) == {key_type.key_of(3), key_type.key_of(4)}
    assert state.truncated_at == 20
    assert (
        await lands(under_test, rows.vector(1, "late", 15), rows.vector(2, "late", 5, snapshot=True)) == set()
    )
    assert await lands(under_test, rows.vector(1, "new", 25)) == {0}
    # an older truncate redelivered does not lower the floor
    await under_test.sink.write(WriteBatch(truncate_at=12))
    assert (await under_test.sink.stored([])).truncated_at == 20


async def test_source_texts_are_read_by_key(under_test: SinkUnderTest, key_type: KeyType) -> None:
    under_test.set_source(1, "title", "a long body")
    under_test.set_source(2, "", None)
    texts = await under_test.sink.source_texts([key_type.key_of(n) for n in (1, 2, 3)])
    assert texts == {key_type.key_of(1): "title\n\na long body", key_type.key_of(2): ""}


async def test_a_documents_chunks_are_replaced_whole_and_go_with_it(
    chunked: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(chunked, rows.chunked(1, ["a1", "a2", "a3"], 10), rows.chunked(2, ["b1", "b2"], 10))
    assert chunked.chunk_texts(1) == ["a1", "a2", "a3"]
    assert await lands(chunked, rows.chunked(1, ["x1", "x2"], 5)) == set()  # older: nothing changes
    assert chunked.chunk_texts(1) == ["a1", "a2", "a3"]
    assert await lands(chunked, rows.chunked(1, ["c1", "c2"], 20)) == {0}
    assert chunked.chunk_texts(1) == ["c1", "c2"]  # none of the old three is left
    assert await lands(chunked, rows.touch(1, "c1 c2", 30)) == {0}
    assert chunked.chunk_texts(1) == ["c1", "c2"]  # the same text keeps its chunks
    assert await lands(chunked, rows.deleted(1, 40), rows.cleared(2, 40)) == {0, 1}
    assert chunked.chunk_texts(1) == [] and chunked.chunk_texts(2) == []
    assert await lands(chunked, rows.chunked(1, ["d1"], 50)) == {0}
    assert chunked.chunk_texts(1) == ["d1"]


async def test_truncate_takes_the_chunks_of_the_documents_it_removes(
    chunked: SinkUnderTest, key_type: KeyType
) -> None:
    rows = Rows(key_type)
    await lands(chunked, rows.chunked(1, ["a1", "a2"], 10), rows.chunked(2, ["b1", "b2"], 30))
    result = await chunked.sink.write(WriteBatch([rows.chunked(3, ["c1"], 40)], truncate_at=20))
    assert result.truncated_rows == 1
    assert (chunked.chunk_texts(1), chunked.chunk_texts(2), chunked.chunk_texts(3)) == (
        [],
        ["b1", "b2"],
        ["c1"],
    )
