"""consumer.ops.backfill: the signal Debezium gets, and what a dry run says."""

from __future__ import annotations

from consumer.ops.backfill import BackfillPlan, _is_snapshot_row, snapshot_signal
from consumer.settings import Settings


def test_the_signal_asks_for_an_incremental_snapshot_of_the_source_table() -> None:
    settings = Settings(source_table="public.documents")
    assert snapshot_signal(settings, None) == {
        "data-collections": ["public.documents"],
        "type": "incremental",
    }
    assert snapshot_signal(settings, "id > 5")["additional-conditions"] == [
        {"data-collection": "public.documents", "filter": "id > 5"}
    ]
    assert snapshot_signal(Settings(source_table="docs"), None)["data-collections"] == ["public.docs"]


def test_a_dry_run_says_what_would_be_embedded_and_what_costs_nothing() -> None:
    plan = BackfillPlan(rows=1000, chars=400_000, current=250)
    said = plan.describe(Settings(model="m"))
    assert said.startswith("1000 rows of public.documents: 750 to embed (about 100,000 tokens")
    assert "250 have a vector of m already" in said


def test_only_snapshot_rows_are_counted_as_progress() -> None:
    assert _is_snapshot_row(b'{"op": "r"}')
    assert not _is_snapshot_row(b'{"op": "u"}')
    assert not _is_snapshot_row(None)
    assert not _is_snapshot_row(b"\\x00garbage")
