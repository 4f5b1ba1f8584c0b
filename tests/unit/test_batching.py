"""consumer.batching: gather_batch (by count, by size, by time, stop) and collapse (newest change per key)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from consumer.batching import collapse, gather_batch
from consumer.events import Change, Op, Origin


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Step:
    records: list[str]
    after_s: float  # how long the fetch takes (capped by its timeout)


@dataclass
class FakeFetch:
    """Plays a script of fetches against a fake clock; once it runs out, nothing more arrives."""

    clock: FakeClock
    script: list[Step]
    calls: list[tuple[int, float]] = field(default_factory=list)

    async def __call__(self, max_records: int, timeout_s: float) -> list[str]:
        self.calls.append((max_records, timeout_s))
        assert timeout_s > 0
        step = self.script.pop(0) if self.script else Step([], timeout_s)
        self.clock.now += min(step.after_s, timeout_s)
        assert len(step.records) <= max_records
        return step.records


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fetcher(clock: FakeClock, *steps: Step) -> FakeFetch:
    return FakeFetch(clock, list(steps))


async def test_gathers_by_count(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a", "b", "c"], 0.01), Step(["d", "e", "f"], 0.01), Step(["g"], 0.01))
    batch = await gather_batch(fetch, max_events=7, linger_s=0.2, idle_s=1.0, clock=clock)
    assert batch == ["a", "b", "c", "d", "e", "f", "g"]
    assert [n for n, _ in fetch.calls] == [7, 4, 1]


async def test_full_first_fetch_returns_at_once(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a", "b"], 0.0))
    assert await gather_batch(fetch, max_events=2, linger_s=5.0, idle_s=5.0, clock=clock) == ["a", "b"]
    assert len(fetch.calls) == 1


async def test_gathers_by_time_counted_from_the_first_record(clock: FakeClock) -> None:
    start = clock.now
    fetch = fetcher(
        clock,
        Step(["a"], 0.05),  # first record after 50 ms: the 200 ms linger starts now
        Step(["b"], 0.1),
        Step(["c"], 0.1),  # exactly at the deadline
        Step(["late"], 0.0),
    )
    batch = await gather_batch(fetch, max_events=100, linger_s=0.2, idle_s=1.0, clock=clock)
    assert batch == ["a", "b", "c"]
    assert [t for _, t in fetch.calls] == pytest.approx([1.0, 0.2, 0.1])
    assert clock.now - start == pytest.approx(0.25)


async def test_without_linger_the_first_fetch_is_the_batch(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a", "b"], 0.3), Step(["c"], 0.0))
    assert await gather_batch(fetch, max_events=10, linger_s=0.0, idle_s=1.0, clock=clock) == ["a", "b"]
    assert fetch.calls == [(10, 1.0)]


async def test_nothing_arrives_returns_empty_after_max_wait(clock: FakeClock) -> None:
    start = clock.now
    fetch = fetcher(clock)
    assert await gather_batch(fetch, max_events=10, linger_s=0.01, idle_s=0.5, clock=clock) == []
    [(max_records, timeout_s)] = fetch.calls
    assert max_records == 10
    assert timeout_s == pytest.approx(0.5)
    assert clock.now - start == pytest.approx(0.5)


async def test_early_empty_fetches_use_the_remaining_time(clock: FakeClock) -> None:
    fetch = fetcher(clock, *[Step([], 0.25)] * 4)  # binary-exact steps: no float residue at the end
    assert await gather_batch(fetch, max_events=10, linger_s=0.01, idle_s=1.0, clock=clock) == []
    assert [t for _, t in fetch.calls] == [1.0, 0.75, 0.5, 0.25]


async def test_gathers_by_size_and_gives_back_what_it_fetched_past_it(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["aaa", "bbb"], 0.01), Step(["cccc", "dd", "e"], 0.01), Step(["f"], 0.0))
    given_back: list[list[str]] = []
    batch = await gather_batch(
        fetch, 10, 0.2, 1.0, clock=clock, max_bytes=10, size=len, give_back=given_back.append
    )
    assert batch == ["aaa", "bbb", "cccc"]  # 10 bytes: the next record would be one too many
    assert given_back == [["dd", "e"]]
    assert len(fetch.calls) == 2  # nothing fetched after the cut


async def test_a_record_over_the_size_bound_is_a_batch_of_its_own(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["huge" * 10, "b"], 0.0), Step(["c"], 0.0))
    given_back: list[list[str]] = []
    batch = await gather_batch(
        fetch, 10, 0.2, 1.0, clock=clock, max_bytes=10, size=len, give_back=given_back.append
    )
    assert batch == ["huge" * 10] and given_back == [["b"]]


async def test_a_batch_that_fills_its_size_exactly_fetches_no_more(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["aaaaa"], 0.0), Step(["bbbbb"], 0.0), Step(["c"], 0.0))
    given_back: list[list[str]] = []
    batch = await gather_batch(
        fetch, 10, 0.2, 1.0, clock=clock, max_bytes=10, size=len, give_back=given_back.append
    )
    assert batch == ["aaaaa", "bbbbb"] and given_back == [] and len(fetch.calls) == 2


async def test_without_a_size_bound_size_is_not_a_limit(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a" * 100, "b" * 100], 0.0))
    assert await gather_batch(fetch, 2, 0.2, 1.0, clock=clock, size=len) == ["a" * 100, "b" * 100]


async def test_should_stop_before_fetching(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a"], 0.0))
    assert await gather_batch(fetch, 10, 0.2, 1.0, should_stop=lambda: True, clock=clock) == []
    assert fetch.calls == []


async def test_should_stop_between_fetches_keeps_what_was_fetched(clock: FakeClock) -> None:
    fetch = fetcher(clock, Step(["a"], 0.01), Step(["b"], 0.01))
    stop_after_one: Callable[[], bool] = lambda: len(fetch.calls) >= 1  # noqa: E731
    assert await gather_batch(fetch, 10, 0.2, 1.0, should_stop=stop_after_one, clock=clock) == ["a"]
    assert len(fetch.calls) == 1


# --- collapse --------------------------------------------------------------------------------------

ORIGIN = Origin("cdc.public.documents", 0, 0)


def change(key: int | str, position: int, op: Op = Op.UPDATE) -> Change:
    return Change(key, op, position, None if op is Op.DELETE else f"{key}@{position}", None, ORIGIN)


def test_collapse_keeps_the_highest_position_per_key() -> None:
    a10, a30, a20, b5, c1 = change(1, 10), change(1, 30), change(1, 20), change(2, 5), change("c", 1)
    winners, losers = collapse([a10, b5, a30, c1, a20])
    assert winners == {1: a30, 2: b5, "c": c1}
    assert winners[1] is a30
    assert len(losers) == 2
    assert losers[0] is a10 and losers[1] is a20


def test_collapse_delete_wins_when_newest() -> None:
    create, delete = change(1, 100, Op.CREATE), change(1, 200, Op.DELETE)
    winners, losers = collapse([delete, create])
    assert winners[1] is delete
    assert losers == [create]


def test_collapse_equal_positions_later_record_wins() -> None:
    first, again = change(1, 50), change(1, 50)
    winners, losers = collapse([first, again])
    assert winners[1] is again
    assert len(losers) == 1 and losers[0] is first


def test_collapse_empty() -> None:
    assert collapse([]) == ({}, [])


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 3, 4]])
def test_collapse_accounts_for_every_change(order: list[int]) -> None:
    changes = [change(1, 10), change(1, 40), change(2, 7), change(1, 20), change(2, 3), change(3, 1)]
    ordered = [changes[i] for i in order]
    winners, losers = collapse(ordered)
    assert {k: c.position for k, c in winners.items()} == {1: 40, 2: 7, 3: 1}
    assert sorted(map(id, [*winners.values(), *losers])) == sorted(map(id, changes))
