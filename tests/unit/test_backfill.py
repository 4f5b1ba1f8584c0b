"""consumer.ops.backfill: the signal Debezium gets, and what a dry run says."""

from __future__ import annotations

from consumer.ops.backfill import BackfillPlan, _is_snapshot_row, price_of, snapshot_signal
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
    plan = BackfillPlan(rows=1000, chars=400_000, current=250, current_chars=100_000)
    assert price_of(Settings(model="m")) is None  # the local model sends no bill
    said = plan.describe(Settings(model="m"))
    assert said.startswith("1000 rows of public.documents: 750 to embed, about 75,000 tokens (100,000 ")
    assert "250 have a vector of m already" in said
    assert "$" not in said


def test_a_dry_run_for_a_priced_api_says_what_the_rows_to_embed_cost() -> None:
    openai = Settings(embedder="openai", openai_model="text-embedding-3-large", openai_dimensions=1024)
    plan = BackfillPlan(
        rows=10, chars=40_000_000, current=5, current_chars=20_000_000, price=price_of(openai)
    )
    # 20M characters still to embed: 5M tokens at OpenAI's list price of $0.13 per million
    assert "5,000,000 tokens, about $0.65 at $0.13 per million tokens" in plan.describe(openai)
    declared = openai.model_copy(update={"openai_price_per_million_tokens": 1.0})
    assert price_of(declared) == 1.0
    # a self-hosted server bills nothing we know of, whatever model it serves
    hosted = openai.model_copy(update={"openai_base_url": "http://tei.gpu:8080/v1"})
    assert price_of(hosted) is None


def test_only_snapshot_rows_are_counted_as_progress() -> None:
    assert _is_snapshot_row(b'{"op": "r"}')
    assert not _is_snapshot_row(b'{"op": "u"}')
    assert not _is_snapshot_row(None)
    assert not _is_snapshot_row(b"\\x00garbage")
