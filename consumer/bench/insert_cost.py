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
from contextlib import nullcontext
from typing import Any

import psycopg

from consumer.bench.cpus import Split, separated
from consumer.bench.flops import summary
from consumer.bench.phases import insert_latencies, wait_embedded
from consumer.bench.pipeline import set_connector_paused
from consumer.consumer_process import ConsumerProcess
from consumer.settings import Settings

Say = Callable[[str], None]
# SEPARATE: the database and the pipeline on different cores (consumer.bench.cpus); APART: the vectors
# in a second Postgres, on the pipeline's cores, as a vector database on a host of its own would be
STOPPED, RUNNING = "stopped (connector paused)", "running"
SEPARATE, APART = "separate cores, ", "vectors in another database, separate cores, "


def blocks(rows: list[dict[str, Any]], count: int) -> list[list[dict[str, Any]]]:
    """`rows` cut into `count` equal consecutive blocks (a remainder is left out)."""
    size = len(rows) // count
    return [rows[i * size : (i + 1) * size] for i in range(count)]


def ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Summary of every condition, and running/stopped ratios of p50 and p99 per placement."""
    result: dict[str, Any] = {label: summary(values) for label, values in samples.items()}
    for prefix, key in (("", ""), (SEPARATE, "separate_"), (APART, "apart_")):
        running, stopped = result.get(prefix + RUNNING), result.get(prefix + STOPPED)
        if running and stopped:
            result[f"{key}p50_ratio"] = running["p50"] / stopped["p50"]
            result[f"{key}p99_ratio"] = running["p99"] / stopped["p99"]
    together, apart = result.get(SEPARATE + RUNNING), result.get(APART + RUNNING)
    if together and apart:  # what writing the vectors there too adds to an insert on the source database
        for q in ("p50", "p99"):
            result[f"vector_writes_{q}_ms"] = together[q] - apart[q]
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
    prefix: str = "",
    vectors: psycopg.Connection[Any] | None = None,
) -> dict[str, list[float]]:
    """`rounds` rounds of: connector paused, a block of inserts; connector resumed and caught up, a block
    with the pipeline running. Given a `placement` (layout, database pids, pipeline pids), the database
    and the pipeline run on separate cores meanwhile. Returns the latencies (ms) by condition, labelled
    with `prefix`. `vectors`: the connection to read the vectors through, where they live apart."""
    stopped, running = prefix + STOPPED, prefix + RUNNING
    todo = iter(blocks(rows, 2 * rounds))
    samples: dict[str, list[float]] = defaultdict(list)

    def insert_block(label: str) -> list[dict[str, Any]]:
        block = next(todo)
        with separated(*placement) if placement else nullcontext():
            samples[label] += insert_latencies(conn, block, pace_s)
        return block

    def catch_up(block: list[dict[str, Any]]) -> None:
        """Every block is embedded before the next one, so the pipeline only ever has its rows to do."""
        wait_embedded(vectors or conn, settings, block[0]["id"], block[-1]["id"] + 1, 300, say)

    for round_ in range(1, rounds + 1):
        say(f"insert latency, {prefix or 'co-located, '}round {round_}/{rounds}: stopped, then running ...")
        set_connector_paused(settings, connector, True)
        paused = insert_block(stopped)
        set_connector_paused(settings, connector, False)
        catch_up(paused)
        catch_up(insert_block(running))
    return samples


def separate_cores(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    connector: str,
    rows: list[dict[str, Any]],
    rounds: int,
    pace_s: float,
    placement: tuple[Split, list[int], list[int]],
    backlog: tuple[int, int] | None,
    say: Say,
    prefix: str = SEPARATE,
) -> dict[str, list[float]]:
    """`alternating` with the database on its own core and a consumer of its own on the others, set
    up for the cores it is given (CDC_TORCH_THREADS) and started on them, as a pod of that size would be
    (OpenVINO, placed there only later, ran its model on the database's core meanwhile): a consumer
    started for two cores and then held on one runs its model far slower, so events pile up and its
    writes arrive in bursts that no deployment would see. `backlog`: ids to catch up on first. Where
    the env puts the vectors in another database, they are read there."""
    layout, database, jvms = placement
    threads = len(layout.pipeline)
    settings = Settings.from_env_map(env)
    log = settings.stack_dir / "logs" / f"bench-consumer-{'apart' if prefix == APART else 'separate'}.log"
    consumer = ConsumerProcess({**env, "CDC_TORCH_THREADS": str(threads)}, log, cpus=layout.pipeline).start()
    try:
        consumer.wait_ready().wait_audited()
        say(f"consumer for the {prefix}rounds ready (pid {consumer.pid}, {threads} torch threads)")
        with psycopg.connect(settings.vector_dsn) as vectors:
            if backlog is not None:
                wait_embedded(vectors, settings, *backlog, 300, say)
            pipeline = [*jvms, consumer.pid]
            return alternating(
                conn,
                settings,
                connector,
                rows,
                rounds,
                pace_s,
                (layout, database, pipeline),
                say,
                prefix,
                vectors,
            )
    finally:
        consumer.stop()


def vectors_apart(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    connector: str,
    rows: list[dict[str, Any]],
    rounds: int,
    pace_s: float,
    placement: tuple[Split, list[int], list[int]],
    say: Say,
) -> dict[str, list[float]]:
    """`separate_cores` with the vectors in the stack's second Postgres (CDC_STACK_VECTOR_DATABASE),
    which runs on the pipeline's cores: what an insert still costs the source database when it does no
    vector work. The consumer is of the same group, so it starts where the rounds before it ended."""
    from consumer.stack import LocalStack

    apart_env = {**env, "CDC_STACK_VECTOR_DATABASE": "true"}
    stack = LocalStack(Settings.from_env_map(apart_env))
    stack.up(progress=say)  # the rest runs already: the second Postgres starts
    vector_pg = stack.vector_postgres
    layout, database, jvms = placement
    try:
        pipeline = [*jvms, *(pid for pid in (vector_pg.pid(),) if pid)]
        return separate_cores(
            conn, apart_env, connector, rows, rounds, pace_s, (layout, database, pipeline), None, say, APART
        )
    finally:
        vector_pg.stop(progress=say)
