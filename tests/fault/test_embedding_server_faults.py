"""The real consumer with CDC_EMBEDDER=openai against infinity behind fault injectors: rate limits and
server errors lose nothing and dead-letter nothing, a refused input alone is dead-lettered, connection
resets are retried until the server is reachable again, and a server that refuses connections holds
the batch until it is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.embedders.openai import identity
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.fault_proxy import REFUSE, StatusProxy, Toxiproxy
from tests.harness import corpus_rows, insert_rows, wait_consistent
from tests.infinity import API_KEY, DIMENSION, InfinityServer, openai_env, own_dead_letters

pytestmark = pytest.mark.fault


@pytest.fixture
def status_proxy(infinity: InfinityServer) -> Iterator[StatusProxy]:
    proxy = StatusProxy(infinity.base_url).start()
    yield proxy
    proxy.stop()


def run(env: dict[str, str], log: Path) -> tuple[ConsumerProcess, Settings, str]:
    settings = Settings.from_env_map(env)
    return (
        ConsumerProcess(env, log).start().wait_ready(),
        settings,
        identity(settings.openai_spec(), DIMENSION),
    )


def test_rate_limits_and_server_errors_lose_nothing_and_only_a_refused_input_is_dead_lettered(
    stack: LocalStack,
    env: dict[str, str],
    status_proxy: StatusProxy,
    db: psycopg.Connection[Any],
    logs_dir: Path,
) -> None:
    rows = corpus_rows(30, skip=57_200, id_base=7_300_000)
    rows[3]["body"] += " " + REFUSE
    rows[17]["body"] += " " + REFUSE
    refused = {rows[3]["id"], rows[17]["id"]}
    status_proxy.rate_limit_first, status_proxy.fail_first = 3, 2
    consumer, settings, model = run(
        openai_env(env, status_proxy.base_url, API_KEY, "embeddings_faults"), logs_dir / "statuses.log"
    )
    try:
        insert_rows(db, rows)
        wait_consistent(db, settings, [r["id"] for r in rows if r["id"] not in refused], model=model)
        wait_until(lambda: own_dead_letters(consumer) >= 2, 120, "the refused inputs")
        assert consumer.metric_sum("cdc_embedder_dead_letters_total", error_class="model_rejected") == 2
        assert own_dead_letters(consumer) == 2
        assert consumer.metric_sum("cdc_embedder_retries_total") == 0  # waited out in place
        assert consumer.metric_sum("cdc_embedder_embed_rate_limited_total") == 3
        assert status_proxy.seen[429] == 3 and status_proxy.seen[500] == 2
        # at least one Retry-After (1 s) waited out; 429s of requests in flight together share one wait
        assert consumer.metric_sum("cdc_embedder_backpressure_seconds_total") >= 1
    finally:
        assert consumer.stop() == 0


def test_connection_resets_are_retried_until_the_server_is_back(
    stack: LocalStack,
    env: dict[str, str],
    infinity: InfinityServer,
    db: psycopg.Connection[Any],
    logs_dir: Path,
) -> None:
    toxiproxy = Toxiproxy(infinity.base_url.removeprefix("http://")).start(logs_dir / "toxiproxy.log")
    rows = corpus_rows(20, skip=57_300, id_base=7_400_000)
    consumer, settings, model = run(
        openai_env(env, toxiproxy.base_url, API_KEY, "embeddings_resets"), logs_dir / "resets.log"
    )
    try:
        toxiproxy.toxic("reset", "reset_peer", timeout=0)
        insert_rows(db, rows)
        wait_until(
            lambda: consumer.metric_sum("cdc_embedder_embed_requests_total", status="error") > 0,
            120,
            "a reset connection",
        )
        toxiproxy.clear("reset")
        wait_consistent(db, settings, [r["id"] for r in rows], model=model)
        assert own_dead_letters(consumer) == 0
    finally:
        assert consumer.stop() == 0
        toxiproxy.stop()


def test_an_unreachable_server_holds_the_batch_and_routes_nothing(
    stack: LocalStack,
    env: dict[str, str],
    infinity: InfinityServer,
    db: psycopg.Connection[Any],
    logs_dir: Path,
) -> None:
    """Refused connections are an outage: the batch waits, paused, however long the server is down,
    instead of its texts going through the retry topic to the dead-letter topic."""
    toxiproxy = Toxiproxy(infinity.base_url.removeprefix("http://")).start(logs_dir / "toxiproxy-down.log")
    rows = corpus_rows(10, skip=57_350, id_base=7_500_000)
    consumer, settings, model = run(
        openai_env(env, toxiproxy.base_url, API_KEY, "embeddings_down"), logs_dir / "down.log"
    )
    try:
        toxiproxy.enable(False)
        insert_rows(db, rows)
        wait_until(lambda: consumer.metric_sum("cdc_embedder_paused_partitions") > 0, 120, "the held batch")
        time.sleep(20)  # longer than all the retries the test stack's CDC_RETRY_* settings give a text
        assert consumer.metric_sum("cdc_embedder_retries_total") == 0
        toxiproxy.enable(True)
        wait_consistent(db, settings, [r["id"] for r in rows], model=model)
        assert own_dead_letters(consumer) == 0
        assert consumer.metric_sum("cdc_embedder_retries_total") == 0
    finally:
        assert consumer.stop() == 0
        toxiproxy.stop()
