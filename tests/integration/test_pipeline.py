"""The pipeline end to end on the real stack: Postgres -> Debezium -> Kafka -> consumer -> pgvector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.settings import Settings
from tests.harness import cli, corpus_rows, flaky_consumer, insert_rows, wait_consistent

pytestmark = pytest.mark.integration


def vectors(db: psycopg.Connection[Any], ids: list[int]) -> dict[int, tuple[Any, ...]]:
    register_vector(db)
    rows = db.execute(
        "SELECT id, embedding, text_sha256, source_lsn, deleted, updated_at FROM public.document_embeddings "
        "WHERE id = ANY(%s)",
        (ids,),
    ).fetchall()
    db.commit()
    return {row[0]: row[1:] for row in rows}


@pytest.fixture(scope="module")
def thousand(pipeline: ConsumerProcess, settings: Settings) -> list[dict[str, Any]]:
    rows = corpus_rows(1000, id_base=1_000_000)
    with psycopg.connect(settings.dsn) as db:
        insert_rows(db, rows)
        wait_consistent(db, settings, [r["id"] for r in rows], timeout_s=600)
    return rows


def test_thousand_rows_get_vectors_whose_nearest_neighbour_is_themselves(
    thousand: list[dict[str, Any]], db: psycopg.Connection[Any], settings: Settings
) -> None:
    embedder = SentenceTransformerEmbedder(settings)
    register_vector(db)
    sample = thousand[::10]
    texts = [f"{r['title']}\n\n{r['body']}" for r in sample]
    queries = embedder.embed(texts).vectors
    wrong = []
    for row, query in zip(sample, queries, strict=True):
        nearest = db.execute(
            "SELECT id, embedding <=> %s FROM public.document_embeddings WHERE embedding IS NOT NULL "
            "ORDER BY embedding <=> %s LIMIT 1",
            (query, query),
        ).fetchone()
        assert nearest is not None
        # Identical texts (the corpus has a few) give identical vectors: distance 0 counts as itself.
        if nearest[0] != row["id"] and nearest[1] > 1e-4:
            wrong.append((row["id"], nearest))
    db.commit()
    assert not wrong, f"{len(wrong)} of {len(sample)} rows are not their own nearest neighbour: {wrong[:5]}"


def test_text_update_changes_the_vector(
    thousand: list[dict[str, Any]], db: psycopg.Connection[Any], settings: Settings
) -> None:
    row = thousand[1]
    before = vectors(db, [row["id"]])[row["id"]]
    db.execute(
        "UPDATE public.documents SET body = %s WHERE id = %s",
        ("A completely new text about sailing.", row["id"]),
    )
    db.commit()
    wait_consistent(db, settings, [row["id"]], timeout_s=60)
    after = vectors(db, [row["id"]])[row["id"]]
    assert after[1] != before[1] and after[2] > before[2]
    assert float(np.dot(after[0].to_numpy(), before[0].to_numpy())) < 0.99


def test_update_of_another_column_does_not_call_the_model(
    thousand: list[dict[str, Any]], db: psycopg.Connection[Any], settings: Settings, pipeline: ConsumerProcess
) -> None:
    row = thousand[2]
    before = vectors(db, [row["id"]])[row["id"]]
    embedded = pipeline.metric_sum("cdc_embedder_texts_embedded_total")
    unchanged = pipeline.metric_sum("cdc_embedder_events_total", outcome="unchanged")
    db.execute("UPDATE public.documents SET tags = ARRAY['x'] WHERE id = %s", (row["id"],))
    db.commit()
    wait_until(
        lambda: vectors(db, [row["id"]])[row["id"]][2] > before[2], 60, "the update's position to be recorded"
    )
    after = vectors(db, [row["id"]])[row["id"]]
    assert after[1] == before[1]
    assert np.array_equal(after[0].to_numpy(), before[0].to_numpy())
    assert pipeline.metric_sum("cdc_embedder_texts_embedded_total") == embedded
    assert pipeline.metric_sum("cdc_embedder_events_total", outcome="unchanged") == unchanged + 1


def test_delete_removes_the_vector(thousand: list[dict[str, Any]], db: psycopg.Connection[Any]) -> None:
    row = thousand[3]
    db.execute("DELETE FROM public.documents WHERE id = %s", (row["id"],))
    db.commit()
    wait_until(lambda: vectors(db, [row["id"]])[row["id"]][3], 60, "the delete to reach the vector table")
    stored = vectors(db, [row["id"]])[row["id"]]
    assert stored[0] is None and stored[3] is True


def test_consumer_restart_mid_stream_loses_nothing(
    pipeline: ConsumerProcess,
    env: dict[str, str],
    db: psycopg.Connection[Any],
    settings: Settings,
    logs_dir: Path,
) -> None:
    rows = corpus_rows(300, skip=1000, id_base=2_000_000)
    insert_rows(db, rows[:150])
    wait_until(lambda: len(vectors(db, [r["id"] for r in rows])) > 20, 120, "the stream to start")
    assert pipeline.stop() == 0, pipeline.tail()
    insert_rows(db, rows[150:])
    pipeline.start().wait_ready()
    wait_consistent(db, settings, [r["id"] for r in rows], timeout_s=300)


def test_replaying_the_topic_from_offset_zero_changes_nothing(
    thousand: list[dict[str, Any]], env: dict[str, str], db: psycopg.Connection[Any], logs_dir: Path
) -> None:
    ids = [r["id"] for r in thousand]
    before = vectors(db, ids)
    # A new consumer group starts at the earliest offset: every change event is applied once more.
    replay = flaky_consumer({**env, "CDC_CONSUMER_GROUP": "replay-from-zero"}, logs_dir / "replay.log")
    replay.start().wait_ready()
    try:
        wait_until(
            lambda: (
                replay.metric_sum("cdc_embedder_events_total") >= len(ids)
                and replay.metric_sum("cdc_embedder_consumer_lag_messages") == 0
            ),
            300,
            "the replaying consumer to catch up",
        )
        assert replay.metric_sum("cdc_embedder_events_total", outcome="embedded") == 0
    finally:
        assert replay.stop() == 0, replay.tail()
    after = vectors(db, ids)
    changed = [i for i in ids if not _same(before.get(i), after.get(i))]
    assert not changed, f"replay changed {len(changed)} rows, e.g. {changed[:5]}"


def _same(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    vector_a, *rest_a = a
    vector_b, *rest_b = b
    same_vector = (vector_a is None and vector_b is None) or (
        vector_a is not None
        and vector_b is not None
        and np.array_equal(vector_a.to_numpy(), vector_b.to_numpy())
    )
    return same_vector and rest_a == rest_b


def test_search_command_finds_a_row_by_its_meaning(
    thousand: list[dict[str, Any]], env: dict[str, str]
) -> None:
    row = thousand[10]
    result = cli(env, "search", f"{row['title']}\n\n{row['body']}", "-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("search "), result.stdout
    # Rows with the very same text tie at similarity 1; the row must be among the top ones.
    assert any(f"[{row['id']}]" in line for line in lines[1:]), f"row {row['id']} not found:\n{result.stdout}"
    assert lines[1].split()[0] == "1.000", result.stdout
