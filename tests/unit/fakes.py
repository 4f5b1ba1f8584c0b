"""In-memory fakes of the model, the vector table and the broker, and Debezium records to feed them."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from consumer.embedders.base import Embedding
from consumer.errors import EventError
from consumer.events import Key, join_text
from consumer.retry import Headers
from consumer.sink import Kind, State, Stored, Write, WriteBatch, WriteResult, admits
from tests.unit.debezium_events import source_block

SOURCE_TOPIC = "cdc.public.documents"
RETRY_TOPIC = "cdc-embedder.retry"  # the default consumer group's
DLQ_TOPIC = "cdc-embedder.dlq"
MODEL = "fake-model"
MAX_ATTEMPTS = 3
TEXT_COLUMNS = ("title", "body")


# --- fakes -----------------------------------------------------------------------------------------


def unit_vector(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Deterministic, L2-normalised, dimension 4."""
    raw = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint32).astype(np.float64)
    vector = raw - raw.mean() + 1.0
    unit: np.ndarray[Any, np.dtype[np.float32]] = (vector / np.linalg.norm(vector)).astype(np.float32)
    return unit


class FakeEmbedder:
    name = MODEL
    dimension = 4
    dtype = "float32"

    def __init__(self, fail_texts: Sequence[str] = (), fail_first_calls: int = 0) -> None:
        self.fail_texts = set(fail_texts)  # these always fail (ValueError: model_error, transient)
        self.fail_first_calls = fail_first_calls  # the first N calls fail whatever they get
        self.calls: list[list[str]] = []

    @property
    def texts_seen(self) -> list[str]:
        return [t for call in self.calls for t in call]

    def embed(self, texts: Sequence[str]) -> Embedding:
        self.calls.append(list(texts))
        if self.fail_first_calls > 0:
            self.fail_first_calls -= 1
            raise RuntimeError("CUDA-less hiccup")
        for text in texts:
            if text in self.fail_texts:
                raise ValueError(f"cannot embed {text!r}")
        vectors = np.stack([unit_vector(t) for t in texts]) if texts else np.zeros((0, 4), np.float32)
        return Embedding(vectors, tokens=sum(len(t.split()) for t in texts), truncated=0)


class StuckEmbedder(FakeEmbedder):
    """A model call that hangs (until `release`, or 5 s): what the CDC_MODEL_TIMEOUT_S watchdog is for."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = 0

    def embed(self, texts: Sequence[str]) -> Embedding:
        self.started += 1
        self.release.wait(5)
        return super().embed(texts)


def k(*parts: int | str) -> Key:
    """A key as the pipeline holds it: the text of each key column."""
    return tuple(str(part) for part in parts)


@dataclass
class Row:
    vector: np.ndarray[Any, Any] | None
    text_sha256: bytes | None
    position: int
    deleted: bool
    snapshot: bool = False
    model: str | None = None


@dataclass
class FakeSink:
    """The vector table in memory. Its rule is `consumer.sink.admits`; the sink contract tests
    (tests/integration/test_sink_contract.py) hold this fake and the real table to the same cases."""

    rows: dict[Key, Row] = field(default_factory=dict)
    chunks: dict[Key, tuple[str, ...]] = field(default_factory=dict)  # a chunked pipeline's chunk texts
    source_rows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # the source table
    truncated_at: int = 0
    model: str = MODEL
    stored_calls: list[list[Key]] = field(default_factory=list)
    text_calls: list[list[Key]] = field(default_factory=list)
    writes: list[WriteBatch] = field(default_factory=list)

    async def stored(self, keys: Sequence[Key]) -> State:
        self.stored_calls.append(list(keys))
        found = {
            key: Stored(r.text_sha256, r.position, r.deleted, r.snapshot, r.model)
            for key in keys
            if (r := self.rows.get(key))
        }
        return State(found, self.truncated_at)

    async def source_texts(self, keys: Sequence[Key]) -> dict[Key, str | EventError]:
        self.text_calls.append(list(keys))
        found: dict[Key, str | EventError] = {}
        for key in keys:
            if key in self.source_rows:
                try:
                    found[key] = join_text(self.source_rows[key], TEXT_COLUMNS) or ""
                except EventError as exc:
                    found[key] = exc
        return found

    async def write(self, batch: WriteBatch) -> WriteResult:
        keys = [w.key for w in batch.rows]
        assert len(keys) == len(set(keys)), "a key appears twice in one WriteBatch"
        self.writes.append(batch)
        truncated = 0
        if batch.truncate_at is not None:
            gone = [key for key, row in self.rows.items() if row.position < batch.truncate_at]
            for key in gone:
                del self.rows[key]
                self.chunks.pop(key, None)
            truncated = len(gone)
            self.truncated_at = max(self.truncated_at, batch.truncate_at)
        landed = {w.key for w in batch.rows if self._apply(w)}
        return WriteResult(frozenset(landed), truncated)

    def _apply(self, write: Write) -> bool:
        current = self.rows.get(write.key)
        stored = (
            None
            if current is None
            else Stored(
                current.text_sha256, current.position, current.deleted, current.snapshot, current.model
            )
        )
        if write.position <= self.truncated_at or not admits(
            stored, write.position, write.snapshot, self.model
        ):
            return False
        if write.kind is Kind.TOUCH:
            if current is None or current.deleted or current.model != self.model:
                return False
            if current.text_sha256 != write.digest:
                return False
            current.position, current.snapshot = write.position, write.snapshot
            return True
        if write.kind is Kind.VECTOR:
            assert write.vector is not None and write.vector.shape == (4,)
        deleted = write.kind is Kind.DELETED
        digest = write.digest if write.kind is Kind.VECTOR else None
        model = None if deleted else self.model
        self.rows[write.key] = Row(write.vector, digest, write.position, deleted, write.snapshot, model)
        self.chunks.pop(write.key, None)
        if write.chunks:
            self.chunks[write.key] = tuple(chunk.text for chunk in write.chunks)
        return True

    async def ping(self) -> None:
        return None

    def snapshot(self) -> dict[Key, tuple[bytes | None, int, bool, bytes | None]]:
        return {
            k: (r.text_sha256, r.position, r.deleted, None if r.vector is None else r.vector.tobytes())
            for k, r in self.rows.items()
        }


@dataclass(frozen=True)
class Published:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers

    @property
    def header(self) -> dict[str, bytes]:
        return dict(self.headers)


@dataclass
class FakePublisher:
    sent: list[Published] = field(default_factory=list)

    async def publish(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        self.sent.append(Published(topic, key, value, list(headers)))

    def to(self, topic: str) -> list[Published]:
        return [p for p in self.sent if p.topic == topic]


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = 0  # ms


# --- building records -----------------------------------------------------------------------------


def event(
    op: str, key: int | str | None, lsn: int, title: Any = None, body: Any = None, ts_ms: int | None = None
) -> bytes:
    after = None if op in ("d", "t") else {"id": key, "title": title, "body": body}
    before = {"id": key, "title": None, "body": None} if op == "d" else None
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": source_block(lsn, ts_ms, txId=900),
            "transaction": None,
            "op": op,
            "ts_ms": ts_ms,
        }
    )


class Topic:
    """Hands out increasing offsets, like a partition of the source topic."""

    def __init__(self, name: str = SOURCE_TOPIC, partition: int = 0) -> None:
        self.name, self.partition, self.next_offset = name, partition, 0

    def record(
        self, key: int | str | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
    ) -> FakeRecord:
        raw_key = None if key is None else orjson.dumps({"id": key})
        offset, self.next_offset = self.next_offset, self.next_offset + 1
        return FakeRecord(self.name, self.partition, offset, raw_key, value, tuple(headers))

    def create(self, key: int | str, lsn: int, title: str, body: str = "body") -> FakeRecord:
        return self.record(key, event("c", key, lsn, title, body))

    def update(self, key: int | str, lsn: int, title: str, body: str = "body") -> FakeRecord:
        return self.record(key, event("u", key, lsn, title, body))

    def snapshot(self, key: int | str, lsn: int, title: str, body: str = "body") -> FakeRecord:
        return self.record(key, event("r", key, lsn, title, body))

    def delete(self, key: int | str, lsn: int) -> FakeRecord:
        return self.record(key, event("d", key, lsn))

    def truncate(self, lsn: int) -> FakeRecord:
        return self.record(None, event("t", None, lsn))

    def tombstone(self, key: int | str) -> FakeRecord:
        return self.record(key, None)


def text_of(title: str, body: str = "body") -> str:
    return f"{title}\n\n{body}"
