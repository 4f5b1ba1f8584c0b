"""A model change without a search gap, on the real stack, under a steady insert load and searches.

The view `public.mg_search` serves the stand-in model (384 dimensions). A second pipeline of the same
table with another model (128 dimensions) is declared, filled by `cdc-embedder backfill new` while
rows keep arriving, and the view is switched, rolled back and switched again while a searcher runs
the whole time. Every search must return rows, all of one model; neither target may lose a change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from consumer.bench.flops import BertShape
from consumer.bench.model import build_random_model
from consumer.connectors import register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.ops import migrate
from consumer.settings import Settings
from consumer.spec import pipeline_settings
from consumer.stack import LocalStack
from tests.harness import cli, corpus_rows, wait_consistent
from tests.key_types import KEY_TYPES

pytestmark = pytest.mark.integration

TABLE = KEY_TYPES["bigint"]
VIEW = "public.mg_search"
VIEW_ID = sql.Identifier("public", "mg_search")
SMALL = BertShape(layers=2, hidden=128, heads=2, intermediate=256)


def declared(old_model: str | None, new_model: str | None) -> dict[str, Any]:
    pipelines: dict[str, Any] = {}
    for name, model in (("old", old_model), ("new", new_model)):
        if model is not None:
            pipelines[name] = {
                "source_table": "public.mg_docs",
                "text_columns": ["title", "body"],
                "vector_table": f"public.mg_{name}_vectors",
                "embedder": {"kind": "local", "model": model},
                "search_view": VIEW,
            }
    return {"pipelines": pipelines}


@pytest.fixture(scope="module")
def files(
    stack: LocalStack, env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, dict[str, str]]]:
    """The env of each stage: the old pipeline alone, old and new, then the new one alone."""
    folder = tmp_path_factory.mktemp("migrate")
    small = str(build_random_model(folder / "small-model", SMALL))
    stages = {"old": (env["CDC_MODEL"], None), "both": (env["CDC_MODEL"], small), "new": (None, small)}
    envs = {}
    for stage, (old, new) in stages.items():
        path = folder / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(declared(old, new)))
        envs[stage] = {**env, "CDC_PIPELINES_FILE": str(path), "CDC_CONSUMER_GROUP": "migrate"}
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        TABLE.create_source(conn, "public", "mg_docs")
    yield envs
    register_connector(settings, progress=print)  # the session's connector captures documents again


class Searcher(threading.Thread):
    """Searches the view as an application would: it reads which model serves the view and searches in
    one transaction, so the switch cannot happen between the two."""

    def __init__(self, dsn: str, embedders: dict[str, SentenceTransformerEmbedder]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.embedders = dsn, embedders
        self.stop = threading.Event()
        self.results: list[tuple[str, int, set[str]]] = []  # (model served, rows, models of the rows)
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            while not self.stop.is_set():
                try:
                    with conn.transaction():
                        served = conn.execute(
                            sql.SQL("SELECT model FROM {} LIMIT 1").format(VIEW_ID)
                        ).fetchone()
                        assert served is not None, "the view is empty"
                        query = self.embedders[served[0]].embed(["a tool to edit text files"]).vectors[0]
                        literal = "[" + ",".join(f"{x:.6f}" for x in query) + "]"
                        nearest = sql.SQL("SELECT model FROM {} ORDER BY embedding <=> %s::vector LIMIT 5")
                        rows = conn.execute(nearest.format(VIEW_ID), (literal,)).fetchall()
                    self.results.append((served[0], len(rows), {r[0] for r in rows}))
                except Exception as exc:  # recorded: the test fails on any of them
                    self.errors.append(repr(exc))
                time.sleep(0.05)


def test_a_model_change_under_load_leaves_no_search_gap(
    files: dict[str, dict[str, str]], settings: Settings, logs_dir: Path, db: psycopg.Connection[Any]
) -> None:
    db.autocommit = True
    both = Settings.from_env_map(files["both"])
    old, new = pipeline_settings(both, "old"), pipeline_settings(both, "new")
    registered = cli(files["old"], "connector", "register")
    assert registered.returncode == 0, registered.stderr
    rows = corpus_rows(60, skip=4000)
    for n, row in enumerate(rows[:30], start=1):
        TABLE.upsert_row(db, "public", "mg_docs", n, row["title"], row["body"])

    consumer = ConsumerProcess(files["old"], logs_dir / "migrate-old.log").start().wait_ready()
    wait_consistent(db, old, [TABLE.values(n) for n in range(1, 31)], timeout_s=240)
    first = cli(files["old"], "migrate", "switch", VIEW, "--to", "old")
    assert first.returncode == 0 and f"{VIEW} now reads old (it read nothing)" in first.stdout, first.stderr
    assert consumer.stop() == 0

    # the new pipeline is declared beside the old one; the old one keeps serving while it fills
    consumer = ConsumerProcess(files["both"], logs_dir / "migrate-both.log").start().wait_ready()
    embedders = {p.model: SentenceTransformerEmbedder(p) for p in (old, new)}
    searcher = Searcher(settings.dsn, embedders)
    searcher.start()
    inserted = 30
    stop_load = threading.Event()

    def load() -> None:
        nonlocal inserted
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            while not stop_load.is_set() and inserted < len(rows):
                row = rows[inserted]
                TABLE.upsert_row(conn, "public", "mg_docs", inserted + 1, row["title"], row["body"])
                inserted += 1
                time.sleep(0.3)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        refused = cli(files["both"], "migrate", "switch", VIEW, "--to", "new")
        assert (
            refused.returncode == 1 and "still lacks" in refused.stderr and "backfill new" in refused.stderr
        )

        filled = cli(files["both"], "backfill", "new")
        assert filled.returncode == 0, filled.stderr

        def complete() -> bool:
            status = cli(files["both"], "migrate", "status", VIEW, "--sample-s", "0.5")
            return (
                status.returncode == 0
                and "new: builds" in status.stdout
                and "complete"
                in (next(line for line in status.stdout.splitlines() if line.startswith("new:")))
            )

        wait_until(complete, 300, "the new target to be complete")
        for step in (["switch", VIEW, "--to", "new"], ["rollback", VIEW], ["switch", VIEW, "--to", "new"]):
            # refused while the rows inserted a moment ago are in one target and not yet in the other
            wait_until(lambda s=step: cli(files["both"], "migrate", *s).returncode == 0, 120, " ".join(step))
            time.sleep(1.0)
        assert "new: serves" in cli(files["both"], "migrate", "status", VIEW, "--sample-s", "0.1").stdout
        # a switch to what the view serves already changes nothing: rollback still leads to old
        assert cli(files["both"], "migrate", "switch", VIEW, "--to", "new").returncode == 0
        registry = sql.Identifier("public", migrate.REGISTRY)
        found = db.execute(
            sql.SQL("SELECT pipeline, previous FROM {} WHERE view = %s").format(registry), (VIEW,)
        )
        assert found.fetchone() == ("new", "old")
    finally:
        stop_load.set()
        loader.join(60)
        searcher.stop.set()
        searcher.join(60)

    keys = [TABLE.values(n) for n in range(1, inserted + 1)]
    wait_consistent(db, old, keys, timeout_s=240)  # no change lost in either target
    wait_consistent(db, new, keys, timeout_s=240)
    served_by = "cdc_embedder_search_view_served_by"
    wait_until(lambda: consumer.metric_sum(served_by, view=VIEW, pipeline="new") == 1, 60, "the gauge")
    assert consumer.metric_sum(served_by, view=VIEW, pipeline="old") == 0
    assert consumer.stop() == 0

    assert not searcher.errors, searcher.errors[:3]
    assert len(searcher.results) >= 20, "the searcher hardly ran"
    assert inserted > 30, "no rows arrived during the migration"
    assert all(count == 5 and models == {served} for served, count, models in searcher.results)
    served = [served for served, _, _ in searcher.results]
    assert {old.model, new.model} <= set(served)  # searches ran on both sides of the switch
    assert served[-1] == new.model

    refused = cli(files["both"], "migrate", "retire", VIEW)
    assert refused.returncode == 1 and "pipeline 'old' is still declared" in refused.stderr
    retired = cli(files["new"], "migrate", "retire", VIEW)
    assert retired.returncode == 0 and "dropped public.mg_old_vectors" in retired.stdout, retired.stderr
    assert db.execute("SELECT to_regclass('public.mg_old_vectors')").fetchone() == (None,)
    assert db.execute(sql.SQL("SELECT count(DISTINCT model) FROM {}").format(VIEW_ID)).fetchone() == (1,)
