"""Two declared pipelines in one consumer process, on the real stack: two tables with different keys and
text recipes, two models of different dimensions, one consumer group with one retry topic.

`cdc-embedder connector register` itself puts both tables in the connector's include list and in the
publication, as a user would run it with the pipelines file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import yaml
from psycopg import sql

from consumer.bench.flops import BertShape
from consumer.bench.model import build_random_model
from consumer.connectors import connector_config, publication_name, register_connector
from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.settings import Settings
from consumer.spec import pipeline_settings
from consumer.stack import LocalStack
from tests.harness import cli, wait_consistent
from tests.key_types import KEY_TYPES

pytestmark = pytest.mark.integration

NOTES, TICKETS = KEY_TYPES["bigint"], KEY_TYPES["composite"]
SMALL = BertShape(layers=2, hidden=128, heads=2, intermediate=256)  # 128 dimensions beside the 384


@pytest.fixture(scope="module")
def two(
    stack: LocalStack, env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The pipelines file, the two source tables (not yet in the publication), the env of a consumer."""
    folder = tmp_path_factory.mktemp("pipelines")
    small_model = build_random_model(folder / "small-model", SMALL)
    declared = {
        "pipelines": {
            "notes": {
                "source_table": "public.pl_notes",
                "text_columns": ["title", "body"],
                "vector_table": "public.pl_note_vectors",
                "embedder": {"kind": "local", "model": env["CDC_MODEL"]},
            },
            "tickets": {
                "source_table": "public.pl_tickets",
                "text_template": "{title} | {body}",
                "vector_table": "public.pl_ticket_vectors",
                "embedder": {"kind": "local", "model": str(small_model), "max_seq_length": 256},
            },
        }
    }
    path = folder / "pipelines.yaml"
    path.write_text(yaml.safe_dump(declared))
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        NOTES.create_source(conn, "public", "pl_notes")
        TICKETS.create_source(conn, "public", "pl_tickets")
    two_env = {**env, "CDC_PIPELINES_FILE": str(path), "CDC_CONSUMER_GROUP": "two-pipelines"}
    yield two_env
    register_connector(settings, progress=print)  # the session's connector captures documents again


def in_publication(conn: psycopg.Connection[Any], settings: Settings, table: str) -> bool:
    query = "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND tablename = %s"
    return conn.execute(query, (publication_name(settings), table)).fetchone() is not None


def stored_vector(conn: psycopg.Connection[Any], view: Settings, where: sql.Composable, *params: Any) -> Any:
    row = conn.execute(
        sql.SQL("SELECT embedding::text FROM {} WHERE {}").format(sql.Identifier(*view.target), where), params
    ).fetchone()
    assert row is not None and row[0] is not None
    return np.array([float(x) for x in row[0].strip("[]").split(",")], dtype=np.float32)


def test_two_pipelines_two_models_in_one_process(
    two: dict[str, str], settings: Settings, logs_dir: Path, db: psycopg.Connection[Any]
) -> None:
    process = Settings.from_env_map(two)
    notes, tickets = pipeline_settings(process, "notes"), pipeline_settings(process, "tickets")
    config = connector_config(process)["config"]
    assert config["table.include.list"] == "public.pl_notes,public.pl_tickets"

    db.autocommit = True
    assert not in_publication(db, settings, "pl_notes")
    registered = cli(two, "connector", "register")
    assert "publication cdc_embedder: added public.pl_notes" in registered.stdout
    assert in_publication(db, settings, "pl_notes") and in_publication(db, settings, "pl_tickets")

    consumer = ConsumerProcess(two, logs_dir / "two-pipelines.log").start()
    try:
        for n in range(1, 6):
            NOTES.upsert_row(db, "public", "pl_notes", n, f"note {n}", f"the body of note {n} about boats")
            TICKETS.upsert_row(db, "public", "pl_tickets", n, f"ticket {n}", f"printer {n} is on fire")
        consumer.wait_ready()
        keys = [NOTES.values(n) for n in range(1, 6)]
        wait_consistent(db, notes, keys, timeout_s=240)
        wait_consistent(db, tickets, [TICKETS.values(n) for n in range(1, 6)], timeout_s=240)

        # each table holds its own model's vectors, of its own dimension and text recipe
        note = stored_vector(db, notes, NOTES.match(), *NOTES.values(3))
        ticket = stored_vector(db, tickets, TICKETS.match(), *TICKETS.values(3))
        assert (note.shape, ticket.shape) == ((384,), (128,))
        expected_note = SentenceTransformerEmbedder(notes).embed(["note 3\n\nthe body of note 3 about boats"])
        expected_ticket = SentenceTransformerEmbedder(tickets).embed(["ticket 3 | printer 3 is on fire"])
        assert float(note @ expected_note.vectors[0]) > 0.999
        assert float(ticket @ expected_ticket.vectors[0]) > 0.999

        # one consumer group, one retry and one dead-letter topic for both; metrics per pipeline
        for name in ("notes", "tickets"):
            assert consumer.metric_sum("cdc_embedder_events_total", pipeline=name, outcome="embedded") >= 5
        assert consumer.metric_sum("cdc_embedder_model_info", pipeline="tickets") == 1
        started = [
            line
            for raw in (logs_dir / "two-pipelines.log").read_text().splitlines()
            if raw.startswith("{")
            and (line := json.loads(raw)).get("event") == "started"
            and "pipeline" in line
        ]
        assert {(line["pipeline"], line["dimension"]) for line in started} == {
            ("notes", 384),
            ("tickets", 128),
        }

        db.execute(
            sql.SQL("DELETE FROM {} WHERE {}").format(
                sql.Identifier("public", "pl_tickets"), TICKETS.match()
            ),
            TICKETS.values(2),
        )
        NOTES.upsert_row(db, "public", "pl_notes", 1, "note 1", "now about trains")
        wait_until(
            lambda: (
                consumer.metric_sum("cdc_embedder_events_total", pipeline="tickets", outcome="deleted") >= 1
            ),
            120,
            "the delete of a ticket",
        )
        wait_consistent(db, notes, keys, timeout_s=120)
        wait_consistent(db, tickets, [TICKETS.values(n) for n in range(1, 6)], timeout_s=120)
    finally:
        assert consumer.stop() == 0
