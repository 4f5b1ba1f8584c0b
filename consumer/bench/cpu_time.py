"""Whose CPU a phase used: the core-seconds of each process tree of the stack, over the phase's wall time.

The end-to-end ratio compares the pipeline with the raw model run alone on every core. On a host where
Postgres (its HNSW inserts, the walsender decoding the WAL), Kafka and Connect share the model's cores,
the model gets what they leave, so the ratio cannot pass 1 - (their core-seconds) / (cores x wall): the
ceiling this phase reports beside the ratio, before anyone tries to win the gap inside the consumer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from consumer.bench.cpus import PROC, children

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CONSUMER = "consumer"
BENCH = "bench client"


def tree_cpu_s(pid: int) -> float:
    """User + system seconds of `pid` and its descendants, with those of the children they reaped (a
    database backend that exited meanwhile is in its postmaster's figure); 0 for a process that is gone."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = (PROC / str(current) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        todo.extend(children(current))
    return total / TICKS_PER_S


def own_cpu_s() -> float:
    """This process's seconds, without its children: the consumer may be one and is counted apart."""
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """Core-seconds of named groups of process trees between start() and stop(); this process is the
    group BENCH."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._start: dict[str, float] = {}
        self._started = 0.0

    def _read(self) -> dict[str, float]:
        used = {name: sum(tree_cpu_s(pid) for pid in pids) for name, pids in self._groups.items()}
        return used | {BENCH: own_cpu_s()}

    def start(self) -> CpuMeter:
        self._start, self._started = self._read(), time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        used = {name: seconds - self._start[name] for name, seconds in self._read().items()}
        return shares(used, wall, len(os.sched_getaffinity(0)))


def shares(used: Mapping[str, float], wall_s: float, cores: int) -> dict[str, float]:
    """Each group's share of the cores x wall the phase had, and the ceiling those left to the consumer:
    1 - everyone else's share."""
    capacity = max(wall_s * cores, 1e-9)
    result = {f"cpu_share_{name.replace(' ', '_')}": seconds / capacity for name, seconds in used.items()}
    others = sum(seconds for name, seconds in used.items() if name != CONSUMER)
    result["cpu_cores"] = float(cores)
    result["ceiling_to_raw"] = max(0.0, 1.0 - others / capacity)
    return result
