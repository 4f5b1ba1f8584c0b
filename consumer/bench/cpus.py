"""CPU placement for the insert-cost phase: the database on one core, the pipeline on the others.

On a shared 2-core host the model takes every core it gets, so with everything co-located the phase
measures CPU contention, not what the pipeline adds to an insert. In production Kafka, Connect and the
consumer run on other hosts; pinning them to other cores emulates that. The walsender that decodes the
WAL for Debezium is a child of the postmaster, so it stays on the database's core, where its cost
belongs, and so does the bench's own client.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def children(pid: int) -> list[int]:
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []


def place(pids: Iterable[int], cpus: set[int], tree: bool = True) -> int:
    """Move every thread of `pids` (and of their descendants when `tree`) to `cpus`; returns how many."""
    todo, moved = list(pids), 0
    while todo:
        pid = todo.pop()
        for tid in _threads(pid):
            try:
                os.sched_setaffinity(tid, cpus)
                moved += 1
            except OSError:  # the thread ended meanwhile
                pass
        if tree:
            todo.extend(children(pid))
    return moved


@dataclass(frozen=True)
class Split:
    database: set[int]
    pipeline: set[int]

    def describe(self) -> str:
        database, pipeline = sorted(self.database), sorted(self.pipeline)
        return f"database and bench client on CPU {database}, pipeline on {pipeline}"


def split() -> Split | None:
    """One core for the database, the rest for the pipeline; None on a single-core machine."""
    cpus = sorted(os.sched_getaffinity(0))
    return Split({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else None


@contextmanager
def separated(layout: Split, database: Iterable[int], pipeline: Iterable[int]) -> Iterator[None]:
    """Within the block the database tree and this process run on `layout.database`, the pipeline
    processes on `layout.pipeline`; afterwards all of them may run anywhere again."""
    everywhere = layout.database | layout.pipeline
    database, pipeline = list(database), list(pipeline)
    place(database, layout.database)
    place([os.getpid()], layout.database, tree=False)  # not the tree: the consumer is our child
    place(pipeline, layout.pipeline)
    try:
        yield
    finally:
        place([*database, *pipeline], everywhere)
        place([os.getpid()], everywhere, tree=False)
