"""Freshness at half load under consumer policies alternated within one run: this host's speed drifts
too much between runs for a lever's effect on a p99 to show in runs apart.

Each round starts a consumer per policy in turn (same group, same stack) and keeps the same steady load
on it; a few seconds of that load warm each consumer up unmeasured, as a consumer that has run a while
has met its shapes. The lags of all rounds are pooled per policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from consumer.bench.flops import summary
from consumer.bench.phases import steady_load
from consumer.consumer_process import ConsumerProcess
from consumer.settings import Settings

Say = Callable[[str], None]
BEFORE = "CDC_KAFKA_FETCH_MAX_WAIT_MS=500 (Kafka's default; before)"
DEFAULT = "CDC_KAFKA_FETCH_MAX_WAIT_MS=50 (the default)"
POLICIES: dict[str, dict[str, str]] = {
    BEFORE: {"CDC_KAFKA_FETCH_MAX_WAIT_MS": "500"},
    DEFAULT: {"CDC_KAFKA_FETCH_MAX_WAIT_MS": "50"},
}
WARM_UP_S = 5.0


def freshness_ab(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    rows: Iterator[dict[str, Any]],
    rate: float,
    seconds: float,
    rounds: int,
    log: Path,
    say: Say,
) -> dict[str, Any]:
    settings = Settings.from_env_map(env)
    lags: dict[str, list[float]] = {name: [] for name in POLICIES}
    for round_ in range(1, rounds + 1):
        for name, update in POLICIES.items():
            say(f"freshness A/B, round {round_}/{rounds}: {name}, {rate:.1f} rows/s for {seconds:.0f} s ...")
            consumer = ConsumerProcess({**env, **update}, log).start()
            try:
                consumer.wait_ready().wait_audited()
                steady_load(conn, settings, rows, rate, WARM_UP_S, say)
                steady = steady_load(conn, settings, rows, rate, seconds, say)
            finally:
                consumer.stop()
            lags[name] += [lag for _, lag in steady["series"]]
            say(f"  p99 {steady['freshness_s']['p99']:.2f} s")
    result: dict[str, Any] = {"rate": rate, "seconds_per_round": seconds, "rounds": float(rounds)}
    result |= {name: summary(values) for name, values in lags.items()}
    result["p99_default_to_before"] = result[DEFAULT]["p99"] / result[BEFORE]["p99"]
    return result
