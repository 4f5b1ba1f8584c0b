import pytest

from consumer.bench.insert_cost import APART, RUNNING, SEPARATE, STOPPED, blocks, ratios


def test_blocks_are_equal_consecutive_cuts_and_leave_the_remainder_out() -> None:
    rows = [{"id": i} for i in range(11)]
    cut = blocks(rows, 4)
    assert [[r["id"] for r in b] for b in cut] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_ratios_compare_running_with_stopped_per_placement() -> None:
    stopped = [1.0] * 99 + [2.0]
    running = [1.1] * 99 + [3.0]
    result = ratios(
        {STOPPED: stopped, RUNNING: running, SEPARATE + STOPPED: stopped, SEPARATE + RUNNING: stopped}
    )
    assert result[RUNNING]["n"] == 100
    assert result["p50_ratio"] == pytest.approx(1.1)
    assert result["p99_ratio"] > 1.1
    assert result["separate_p50_ratio"] == pytest.approx(1.0)
    assert result["separate_p99_ratio"] == pytest.approx(1.0)


def test_ratios_without_a_separated_placement_have_no_separate_ratio() -> None:
    result = ratios({STOPPED: [1.0, 2.0], RUNNING: [1.0, 2.0]})
    assert result["p99_ratio"] == pytest.approx(1.0)
    assert not any(k.startswith("separate") for k in result)


def test_vectors_in_another_database_get_their_own_ratios_and_the_difference_is_the_vector_writes() -> None:
    result = ratios(
        {
            SEPARATE + STOPPED: [1.0] * 10,
            SEPARATE + RUNNING: [1.5] * 10,
            APART + STOPPED: [1.0] * 10,
            APART + RUNNING: [1.1] * 10,
        }
    )
    assert result["apart_p50_ratio"] == 1.1 and result["separate_p50_ratio"] == 1.5
    assert round(result["vector_writes_p50_ms"], 6) == 0.4
