"""Micro-batching: gather records by count, size and time, and collapse changes of one key to the newest."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from consumer.events import Change, Key, supersedes

T = TypeVar("T")


async def gather_batch(
    fetch: Callable[[int, float], Awaitable[list[T]]],
    max_events: int,
    linger_s: float,
    idle_s: float,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    max_bytes: int = 0,
    size: Callable[[T], int] = lambda _: 0,
    give_back: Callable[[list[T]], None] = lambda _: None,
) -> list[T]:
    """Fetch until `max_events` records, `max_bytes` of them, or until `linger_s` after the first record.

    ``fetch(max_records, timeout_s)`` returns what is there within the timeout. Records that arrived
    while the previous batch ran come back from the first fetch at once, so under load batches fill
    without lingering, and a short linger keeps an idle pipeline's latency low. Waiting for the first
    record is bounded by `idle_s`, so the caller gets control back regularly (shutdown, outages).
    A batch takes its first record whatever its `size`; records fetched past `max_bytes` (0: no bound)
    go to `give_back`, for the caller to fetch them again.
    """
    batch: list[T] = []
    used = 0
    deadline = clock() + idle_s
    while len(batch) < max_events and not should_stop() and not (max_bytes and used >= max_bytes):
        remaining = deadline - clock()
        if remaining <= 0:
            break
        records = await fetch(max_events - len(batch), remaining)
        first = not batch
        for index, record in enumerate(records):
            used += size(record)
            if max_bytes and batch and used > max_bytes:
                give_back(records[index:])
                return batch
            batch.append(record)
        if records and first:
            if linger_s <= 0:
                return batch
            deadline = clock() + linger_s
    return batch


def collapse(changes: Iterable[Change]) -> tuple[dict[Key, Change], list[Change]]:
    """Keep the newest change of each key (`supersedes`); return the winners and the losers.

    Of two equally new records (a duplicate) the later one wins.
    """
    newest: dict[Key, Change] = {}
    superseded: list[Change] = []
    for change in changes:
        current = newest.get(change.key)
        if current is None or not supersedes(
            current.position, current.is_snapshot, change.position, change.is_snapshot
        ):
            if current is not None:
                superseded.append(current)
            newest[change.key] = change
        else:
            superseded.append(change)
    return newest, superseded
