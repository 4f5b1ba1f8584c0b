"""Consumer policies alternated within one run: this host's speed drifts too much between runs for a
lever's effect to show in runs apart.

Each round starts a consumer per policy in turn (same group, same stack, past its start-up audit) and
measures it under the same load; the results of all rounds are pooled per policy. Two A/Bs use it:
freshness at half load under Kafka's fetch wait, and bulk throughput with a batch's vectors written in
one go or in parts beside the model (CDC_BATCH_WRITE_PARTS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from consumer.bench.cpus import Split, separated
from consumer.bench.flops import summary
from consumer.bench.phases import bulk_throughput, steady_load
from consumer.consumer_process import ConsumerProcess
from consumer.settings import Settings

Say = Callable[[str], None]
T = TypeVar("T")
BEFORE = "CDC_KAFKA_FETCH_MAX_WAIT_MS=500 (Kafka's default; before)"
DEFAULT = "CDC_KAFKA_FETCH_MAX_WAIT_MS=50 (the default)"
POLICIES: dict[str, dict[str, str]] = {
    BEFORE: {"CDC_KAFKA_FETCH_MAX_WAIT_MS": "500"},
    DEFAULT: {"CDC_KAFKA_FETCH_MAX_WAIT_MS": "50"},
}
WRITE_ONCE = "CDC_BATCH_WRITE_PARTS=1 (one write after the model; before)"
WRITE_PARTS = "CDC_BATCH_WRITE_PARTS=4 (the default)"
WRITE_POLICIES: dict[str, dict[str, str]] = {
    WRITE_ONCE: {"CDC_BATCH_WRITE_PARTS": "1"},
    WRITE_PARTS: {"CDC_BATCH_WRITE_PARTS": "4"},
}
WARM_UP_S = 5.0
WARM_UP_ROWS = 128  # a fresh consumer's first batches meet new shapes; not measured


def alternate(
    env: dict[str, str],
    policies: Mapping[str, dict[str, str]],
    rounds: int,
    log: Path,
    measure: Callable[[str, int, ConsumerProcess], T],
    cpus: set[int] | None = None,
) -> dict[str, list[T]]:
    """`measure(policy, round, consumer)` with a consumer of each policy running (started on `cpus`),
    the policies in turn each round."""
    results: dict[str, list[T]] = {name: [] for name in policies}
    for round_ in range(1, rounds + 1):
        for name, update in policies.items():
            consumer = ConsumerProcess({**env, **update}, log, cpus=cpus).start()
            try:
                consumer.wait_ready().wait_audited()
                results[name].append(measure(name, round_, consumer))
            finally:
                consumer.stop()
    return results


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

    def measure(name: str, round_: int, _: ConsumerProcess) -> list[float]:
        say(f"freshness A/B, round {round_}/{rounds}: {name}, {rate:.1f} rows/s for {seconds:.0f} s ...")
        steady_load(conn, settings, rows, rate, WARM_UP_S, say)
        steady = steady_load(conn, settings, rows, rate, seconds, say)
        say(f"  p99 {steady['freshness_s']['p99']:.2f} s")
        return [lag for _, lag in steady["series"]]

    lags = alternate(env, POLICIES, rounds, log, measure)
    result: dict[str, Any] = {"rate": rate, "seconds_per_round": seconds, "rounds": float(rounds)}
    result |= {name: summary([lag for run in runs for lag in run]) for name, runs in lags.items()}
    result["p99_default_to_before"] = result[DEFAULT]["p99"] / result[BEFORE]["p99"]
    return result


def write_parts_ab(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    rows: Iterator[dict[str, Any]],
    n: int,
    rounds: int,
    placement: tuple[Split, list[int], list[int]] | None,
    log: Path,
    say: Say,
) -> dict[str, Any]:
    """Bulk loads of `n` new rows each, alternating a batch's vectors written at once and in parts:
    co-located, and, given a `placement`, with the database on a core of its own (the others for Kafka,
    Connect and a consumer set up for them), as where Postgres has a host of its own."""
    settings = Settings.from_env_map(env)
    result: dict[str, Any] = {"texts_per_round": float(n), "rounds": float(rounds)}
    layouts = {"co-located": None} | ({"database on a core of its own": placement} if placement else {})
    for where, apart in layouts.items():

        def measure(
            name: str, round_: int, consumer: ConsumerProcess, where: str = where, apart: Any = apart
        ) -> float:
            say(f"write A/B, {where}, round {round_}/{rounds}: {name}, COPY {n} rows ...")
            with contextlib.ExitStack() as stack:
                if apart is not None:
                    layout, database, jvms = apart
                    stack.enter_context(separated(layout, database, [*jvms, consumer.pid]))
                bulk_throughput(conn, settings, list(islice(rows, WARM_UP_ROWS)), say)
                rate = bulk_throughput(conn, settings, list(islice(rows, n)), say)["texts_per_s"]
            say(f"  {rate:.1f} texts/s")
            return rate

        threads = {} if apart is None else {"CDC_TORCH_THREADS": str(len(apart[0].pipeline))}
        policies = {name: {**policy, **threads} for name, policy in WRITE_POLICIES.items()}
        rates = alternate(env, policies, rounds, log, measure, None if apart is None else apart[0].pipeline)
        ratio = max(rates[WRITE_PARTS]) / max(rates[WRITE_ONCE])
        say(f"  {where}: parts / once {ratio:.2f} (best of {rounds})")
        result |= {f"{where}, {name}": {"best": max(r), "mean": sum(r) / len(r)} for name, r in rates.items()}
        result[f"{where}, parts to once"] = ratio
    return result
