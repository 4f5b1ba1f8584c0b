"""consumer.bench.cpus: placing process trees on cores (this process and a child, no stack needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.bench.cpus import Split, place, separated, split
from consumer.consumer_process import ConsumerProcess

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")


def affinity_of_threads(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_split_gives_the_database_one_core_and_the_pipeline_the_rest() -> None:
    layout = split()
    if len(CPUS) < 2:
        assert layout is None
        return
    assert layout == Split({CPUS[0]}, set(CPUS[1:]))
    assert "CPU [" in layout.describe()


@needs_two
def test_place_moves_every_thread_of_a_tree(child: subprocess.Popen[bytes]) -> None:
    # the child is our descendant: placing our tree moves it too
    try:
        assert place([os.getpid()], {CPUS[1]}) >= 2
        assert affinity_of_threads(child.pid) == {frozenset({CPUS[1]})}
    finally:
        place([os.getpid()], set(CPUS))
    assert affinity_of_threads(child.pid) == {frozenset(CPUS)}


@needs_two
def test_separated_restores_every_core_afterwards(child: subprocess.Popen[bytes]) -> None:
    layout = Split({CPUS[0]}, {CPUS[1]})
    with separated(layout, [], [child.pid]):
        assert affinity_of_threads(child.pid) == {frozenset({CPUS[1]})}
        assert os.sched_getaffinity(0) == {CPUS[0]}
    assert affinity_of_threads(child.pid) == {frozenset(CPUS)}
    assert os.sched_getaffinity(0) == set(CPUS)


@needs_two
def test_a_consumer_process_starts_on_the_cpus_it_is_given(tmp_path: Path) -> None:
    # from its start, not moved there later: OpenVINO's thread pool keeps the CPUs a process started with
    log = tmp_path / "consumer.log"
    script = "import os; print(sorted(os.sched_getaffinity(0)))"
    consumer = ConsumerProcess({}, log, argv=[sys.executable, "-c", script], cpus={CPUS[1]}).start()
    assert consumer.process is not None and consumer.process.wait(60) == 0
    assert log.read_text().strip() == str([CPUS[1]])
    assert os.sched_getaffinity(0) == set(CPUS)  # the parent's own CPUs unchanged
