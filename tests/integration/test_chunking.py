"""Chunked embedding (CDC_CHUNKING=chunk) on the real stack: Debezium, Kafka, the consumer process,
the model stand-in and pgvector, with the corpus's longest texts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer.bench.model import CORPUS
from consumer.connectors import register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import cli, wait_consistent
from tests.key_types import KEY_TYPES

pytestmark = pytest.mark.integration

DOCS = KEY_TYPES["bigint"]
SOURCE, VECTORS = "ch_docs", "ch_doc_vectors"


def longest_texts(n: int) -> list[str]:
    with CORPUS.open() as f:
        texts = [json.loads(line)["text"] for line in f]
    return sorted(texts, key=len, reverse=True)[:n]


@pytest.fixture(scope="module")
def chunked(stack: LocalStack, env: dict[str, str], settings: Settings) -> Iterator[dict[str, str]]:
    """The env of a consumer of a chunked pipeline on its own table, captured by the connector."""
    chunk_env = {
        **env,
        "CDC_SOURCE_TABLE": f"public.{SOURCE}",
        "CDC_VECTOR_TABLE": f"public.{VECTORS}",
        "CDC_CHUNKING": "chunk",
        "CDC_CONSUMER_GROUP": "chunking",
    }
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        DOCS.create_source(conn, "public", SOURCE)
    cli(chunk_env, "connector", "register")
    yield chunk_env
    register_connector(settings, progress=print)  # the session's connector captures documents again


def chunk_texts(conn: psycopg.Connection[Any], view: Settings, n: int) -> list[str]:
    rows = conn.execute(
        sql.SQL("SELECT chunk_text FROM {} WHERE {} ORDER BY chunk_index").format(
            sql.Identifier(*view.chunk_target), DOCS.match()
        ),
        DOCS.values(n),
    ).fetchall()
    return [row[0] for row in rows]


class ChunkWatcher(threading.Thread):
    """Reads one document's chunks as fast as it can, as a search would, and keeps what it saw."""

    def __init__(self, view: Settings, n: int) -> None:
        super().__init__(daemon=True)
        self.view, self.n = view, n
        self.seen: set[tuple[str, ...]] = set()
        self.reads = 0
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.view.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                self.seen.add(tuple(chunk_texts(conn, self.view, self.n)))
                self.reads += 1


def test_long_texts_are_chunked_found_by_their_end_replaced_whole_and_deleted_whole(
    chunked: dict[str, str], logs_dir: Path, db: psycopg.Connection[Any]
) -> None:
    view = Settings.from_env_map(chunked)
    first, second, third = longest_texts(3)
    db.autocommit = True
    consumer = ConsumerProcess(chunked, logs_dir / "chunking.log").start()
    try:
        DOCS.upsert_row(db, "public", SOURCE, 1, "longest", first)
        DOCS.upsert_row(db, "public", SOURCE, 2, "short", "a short note about boats")
        DOCS.upsert_row(db, "public", SOURCE, 3, "third", third)
        consumer.wait_ready()
        ids = [DOCS.values(n) for n in (1, 2, 3)]
        wait_consistent(db, view, ids, timeout_s=240)

        # every chunk fits the model's window, and together they hold the whole text, its end included
        model = SentenceTransformerEmbedder(view)
        tokenizer = model.tokenizer()
        chunks = chunk_texts(db, view, 1)
        assert len(chunks) > 20
        assert max(len(tokenizer.encode(c).ids) for c in chunks) <= model.window
        tail = " ".join(first.split()[-40:])
        assert tail.split()[-1] in chunks[-1] and first.split()[0] in chunks[0]
        assert chunk_texts(db, view, 2) == ["short\n\na short note about boats"]
        assert consumer.metric_sum("cdc_embedder_chunked_documents_total") >= 2

        # a query taken from the end of the longest text, past any model window, finds that document
        found = cli(chunked, "search", "-k", "3", tail).stdout.splitlines()
        best = next(line for line in found if line.startswith("  "))
        assert f"[{DOCS.values(1)[0]}] chunk " in best, found
        index = int(best.split(" chunk ")[1].split(":")[0])
        assert index >= len(chunks) - 2, f"found by chunk {index} of {len(chunks)}, not by the end"

        # an edit replaces all of its chunks in one transaction, under a reader that never stops
        watcher = ChunkWatcher(view, 1)
        watcher.start()
        try:
            DOCS.upsert_row(db, "public", SOURCE, 1, "longest", second)
            wait_consistent(db, view, ids, timeout_s=240)
            edited = chunk_texts(db, view, 1)
            wait_until(lambda: tuple(edited) in watcher.seen, 30, "the reader to see the new chunks")
        finally:
            watcher.done.set()
            watcher.join()
        assert edited != chunks and watcher.reads > 10
        assert watcher.seen == {tuple(chunks), tuple(edited)}, "a reader saw a mix of old and new chunks"

        # a delete leaves no chunk
        db.execute(sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier("public", SOURCE), DOCS.match()),
                   DOCS.values(3))  # fmt: skip
        wait_until(
            lambda: consumer.metric_sum("cdc_embedder_events_total", outcome="deleted") >= 1,
            120,
            "the delete",
        )
        wait_consistent(db, view, ids, timeout_s=120)
        assert chunk_texts(db, view, 3) == [] and len(chunk_texts(db, view, 1)) > 1
    finally:
        assert consumer.stop() == 0


def test_a_batch_takes_what_its_byte_budget_allows_and_the_next_batches_the_rest(
    chunked: dict[str, str], logs_dir: Path, db: psycopg.Connection[Any]
) -> None:
    """CDC_BATCH_MAX_BYTES bounds the model time of a batch of long documents. Under a budget below one
    document each change is a batch of its own, though all queued before the consumer started, and the
    records a fetch returned past the budget are fetched again: none is skipped."""
    view = Settings.from_env_map(chunked)
    texts = longest_texts(9)[3:]
    db.autocommit = True
    for n, text in enumerate(texts, start=10):
        DOCS.upsert_row(db, "public", SOURCE, n, f"long document {n}", text)
    consumer = ConsumerProcess({**chunked, "CDC_BATCH_MAX_BYTES": "4096"}, logs_dir / "chunk-budget.log")
    consumer.start()
    try:
        consumer.wait_ready()
        wait_consistent(db, view, [DOCS.values(n) for n in range(10, 10 + len(texts))], timeout_s=300)
        batches = consumer.metric_sum("cdc_embedder_batch_size_events_count")
        assert batches >= len(texts)
        assert consumer.metric_sum("cdc_embedder_batch_size_events_bucket", le="1.0") == batches
    finally:
        assert consumer.stop() == 0
