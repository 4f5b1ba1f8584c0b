"""Insert cost: single-row insert latency with the pipeline running versus stopped, in alternating rounds.

The two conditions alternate within one run (stopped, running, stopped, running, ...) because the
shared host's speed drifts by a third within minutes: measured one after the other, the drift between
them would dominate a ratio whose target is 1.1. "Stopped" pauses the Debezium connector, so nothing is
captured or embedded; before each running block the rows of the stopped block are caught up, so the
running block sees only its own rows, at its own pace.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import psycopg

from consumer.bench.cpus import Split, separated
from consumer.bench.flops import summary
from consumer.bench.phases import insert_latencies, wait_embedded
from consumer.bench.pipeline import set_connector_paused
from consumer.settings import Settings

Say = Callable[[str], None]
# SEPARATE: the database and the pipeline on different cores (consumer.bench.cpus)
STOPPED, RUNNING, SEPARATE = "stopped (connector paused)", "running", "separate cores, "


def blocks(rows: list[dict[str, Any]], count: int) -> list[list[dict[str, Any]]]:
    """`rows` cut into `count` equal consecutive blocks (a remainder is left out)."""
    size = len(rows) // count
    return [rows[i * size : (i + 1) * size] for i in range(count)]


def ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Summary of every condition, and running/stopped ratios of p50 and p99 per placement."""
    result: dict[str, Any] = {label: summary(values) for label, values in samples.items()}
    for prefix, key in (("", ""), (SEPARATE, "separate_")):
        running, stopped = result.get(prefix + RUNNING), result.get(prefix + STOPPED)
        if running and stopped:
            result[f"{key}p50_ratio"] = running["p50"] / stopped["p50"]
            result[f"{key}p99_ratio"] = running["p99"] / stopped["p99"]
    return result


def alternating(
    conn: psycopg.Connection[Any],
    settings: Settings,
    connector: str,
    rows: list[dict[str, Any]],
    rounds: int,
    pace_s: float,
    placement: tuple[Split, Iterable[int], Iterable[int]] | None,
    say: Say,
) -> dict[str, Any]:
    """`rounds` rounds of: connector paused, a block of inserts (and one more with the database on its
    own core, given a `placement` of (layout, database pids, pipeline pids)); connector resumed and
    caught up; the same again with the pipeline running. Returns `ratios` of all samples."""
    labels = [STOPPED, RUNNING] + ([SEPARATE + STOPPED, SEPARATE + RUNNING] if placement else [])
    todo = iter(blocks(rows, rounds * len(labels)))
    samples: dict[str, list[float]] = defaultdict(list)
    inserted: list[dict[str, Any]] = []

    def measure(label: str) -> list[dict[str, Any]]:
        block = next(todo)
        inserted.extend(block)
        placed: AbstractContextManager[None] = (
            separated(*placement) if placement and label.startswith(SEPARATE) else nullcontext()
        )
        with placed:
            samples[label] += insert_latencies(conn, block, pace_s)
        return block

    for round_ in range(1, rounds + 1):
        say(f"insert latency, round {round_}/{rounds}: {', '.join(labels)} ...")
        set_connector_paused(settings, connector, True)
        paused = [row for label in labels if STOPPED in label for row in measure(label)]
        set_connector_paused(settings, connector, False)
        wait_embedded(conn, settings, paused[0]["id"], paused[-1]["id"] + 1, 300, say)
        for label in labels:
            if RUNNING in label:
                measure(label)
    wait_embedded(conn, settings, inserted[0]["id"], inserted[-1]["id"] + 1, 300, say)
    result = ratios(samples)
    result["rounds"] = rounds
    shown = [f"{k} {result[k]:.2f}" for k in ("p99_ratio", "separate_p99_ratio") if k in result]
    say(f"  running/stopped: {', '.join(shown)}")
    return result
