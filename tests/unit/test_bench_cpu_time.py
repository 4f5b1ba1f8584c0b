"""consumer.bench.cpu_time: whose CPU a phase used (a child process tree here, no stack needed)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from consumer.bench.cpu_time import BENCH, CONSUMER, CpuMeter, shares, tree_cpu_s
from consumer.bench.cpus import children

# CPU work of a fixed size: its CPU seconds, unlike its wall time, do not depend on the neighbours
BURN = "sum(i * i for i in range(10_000_000))"


def test_the_ceiling_is_what_everyone_but_the_consumer_leaves() -> None:
    used = {CONSUMER: 14.0, "database": 3.0, "kafka and connect": 2.0, BENCH: 1.0}
    result = shares(used, wall_s=10.0, cores=2)

    assert result["cpu_share_consumer"] == pytest.approx(0.70)
    assert result["cpu_share_kafka_and_connect"] == pytest.approx(0.10)
    assert result["cpu_share_bench_client"] == pytest.approx(0.05)
    assert result["ceiling_to_raw"] == pytest.approx(1 - 6.0 / 20.0)
    assert result["cpu_cores"] == 2.0


def test_a_tree_keeps_the_cpu_of_a_child_that_exited() -> None:
    """A database backend that ended during the phase still counts, through its parent's reaped time."""
    parent = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{BURN}"; exec sleep 60'])
    try:
        deadline = time.monotonic() + 120
        # the burner ran and was reaped once `sh` has exec'd into sleep, which has no children
        while _command(parent.pid) != "sleep" or children(parent.pid):
            assert time.monotonic() < deadline, "the child never finished"
            time.sleep(0.05)
        assert tree_cpu_s(parent.pid) >= 0.2
    finally:
        parent.kill()
        parent.wait()


def test_the_meter_counts_a_tree_and_this_process_apart() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        meter = CpuMeter({CONSUMER: [sleeper.pid]}).start()
        eval(BURN)  # this process's work: the bench client's, not the tree's
        result = meter.stop()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result["cpu_share_bench_client"] > result["cpu_share_consumer"]
    assert result["ceiling_to_raw"] < 1.0


def test_a_process_that_is_gone_counts_nothing() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert tree_cpu_s(gone.pid) == 0.0


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
