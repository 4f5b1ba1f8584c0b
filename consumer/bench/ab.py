"""Consumer policies alternated within one run: this host's speed drifts too much between runs for a
lever's effect to show in runs apart.

Each round starts a consumer per policy in turn (same group, same stack, past its start-up audit) and
measures it under the same load; the results of all rounds are pooled per policy. Two A/Bs use it:
freshness at half load with the next batch embedded ahead or not (CDC_EMBED_AHEAD), and bulk throughput
with a batch's vectors written in one go or in parts beside the model (CDC_BATCH_WRITE_PARTS).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from consumer.bench import model as bm
from consumer.bench.cpus import Split, place, separated
from consumer.bench.flops import GTE_SMALL, summary
from consumer.bench.phases import bulk_throughput, steady_load
from consumer.consumer_process import ConsumerProcess
from consumer.settings import Settings

Say = Callable[[str], None]
T = TypeVar("T")
# Until 2026-12-07 this A/B was Kafka's fetch wait: 500 ms (its default) against 50 (ours; README).
BEFORE = "CDC_EMBED_AHEAD=false (one batch at a time; before)"
DEFAULT = "CDC_EMBED_AHEAD=true (the default)"
POLICIES: dict[str, dict[str, str]] = {
    BEFORE: {"CDC_EMBED_AHEAD": "false"},
    DEFAULT: {"CDC_EMBED_AHEAD": "true"},
}
# Parts let the write run beside the model's next part; since the next batch is embedded ahead
# (CDC_EMBED_AHEAD) beside the whole write, one write a batch is the default.
WRITE_ONCE = "CDC_BATCH_WRITE_PARTS=1 (the default)"
WRITE_PARTS = "CDC_BATCH_WRITE_PARTS=4 (the default until embedding ahead)"
WRITE_POLICIES: dict[str, dict[str, str]] = {
    WRITE_ONCE: {"CDC_BATCH_WRITE_PARTS": "1"},
    WRITE_PARTS: {"CDC_BATCH_WRITE_PARTS": "4"},
}
APART = "consumer on a core of its own"
END_TO_END_APART = f"{APART}, end to end / raw model on its core"
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
    co-located, and, given a `placement`, with the consumer on a core of its own and the database, Kafka
    and Connect on the other, as on hosts apart.

    Apart, each round also runs the raw model on the consumer's core with the consumer's threads, on
    the texts of that round's load: the ratio of the two is what the consumer itself adds to the model
    (decoding, the writes it waits for, the Kafka transaction), without the stack's CPU that caps the
    co-located ratio (bench.cpu_time).
    """
    settings = Settings.from_env_map(env)
    result: dict[str, Any] = {"texts_per_round": float(n), "rounds": float(rounds)}
    layouts = {"co-located": None} | ({APART: placement} if placement else {})
    raw_rates: list[float] = []
    for where, apart in layouts.items():
        raw = None if apart is None else _raw_on(settings, apart[0].pipeline, say)

        def measure(
            name: str,
            round_: int,
            consumer: ConsumerProcess,
            where: str = where,
            apart: Any = apart,
            raw: Callable[[list[dict[str, Any]]], float] | None = raw,
        ) -> float:
            say(f"write A/B, {where}, round {round_}/{rounds}: {name}, COPY {n} rows ...")
            load = list(islice(rows, n))
            with contextlib.ExitStack() as stack:
                if apart is not None:
                    layout, database, jvms = apart
                    stack.enter_context(separated(layout, [*database, *jvms], [consumer.pid]))
                bulk_throughput(conn, settings, list(islice(rows, WARM_UP_ROWS)), say)
                rate = bulk_throughput(conn, settings, load, say)["texts_per_s"]
            say(f"  {rate:.1f} texts/s")
            if raw is not None and name == WRITE_ONCE:
                raw_rates.append(raw(load))
            return rate

        threads = {} if apart is None else {"CDC_TORCH_THREADS": str(len(apart[0].pipeline))}
        policies = {name: {**policy, **threads} for name, policy in WRITE_POLICIES.items()}
        rates = alternate(env, policies, rounds, log, measure, None if apart is None else apart[0].pipeline)
        ratio = max(rates[WRITE_PARTS]) / max(rates[WRITE_ONCE])
        say(f"  {where}: parts / once {ratio:.2f} (best of {rounds})")
        result |= {f"{where}, {name}": {"best": max(r), "mean": sum(r) / len(r)} for name, r in rates.items()}
        result[f"{where}, parts to once"] = ratio
        if raw_rates:
            result[f"{where}, raw model on the consumer's core"] = {
                "best": max(raw_rates),
                "mean": sum(raw_rates) / len(raw_rates),
            }
            result[END_TO_END_APART] = max(rates[WRITE_ONCE]) / max(raw_rates)
            say(
                f"  {where}: end to end / raw model on its core {result[END_TO_END_APART]:.2f} (best of each)"
            )
    return result


def _raw_on(settings: Settings, cpus: set[int], say: Say) -> Callable[[list[dict[str, Any]]], float]:
    """The raw model as the consumer there runs it (its threads), measured on `cpus` while the stack
    idles: texts/s on the rows' texts."""
    embedder = bm.local_embedder(settings.model_copy(update={"torch_threads": len(cpus)}))
    everywhere = os.sched_getaffinity(0)

    def run(load: list[dict[str, Any]]) -> float:
        place([os.getpid()], cpus, tree=False)
        try:
            texts = bm.texts_of(load, settings)
            rate = bm.encode_run(embedder, texts, settings.batch_max_events, GTE_SMALL)["texts_per_s"]
        finally:
            place([os.getpid()], everywhere, tree=False)
        say(f"  raw model on CPU {sorted(cpus)}, {len(texts)} texts: {rate:.1f} texts/s")
        return rate

    return run
