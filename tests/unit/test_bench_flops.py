"""The bench's pure functions: FLOPs arithmetic, percentiles, slopes, token-budget groups, the report."""

from __future__ import annotations

import math

import pytest

from consumer.bench.flops import (
    GTE_SMALL,
    BertShape,
    flops_for_lengths,
    flops_per_token,
    histogram_quantile,
    matmul_params_per_layer,
    percentile,
    slope,
)
from consumer.bench.machine import cuda_rss_of
from consumer.bench.report import render_markdown, targets
from consumer.embedders.local import budget_groups


def test_gte_small_matmul_weights_per_layer() -> None:
    # Q, K, V, output: 4 x 384 x 384; FFN: 2 x 384 x 1536
    assert matmul_params_per_layer(GTE_SMALL) == 4 * 384 * 384 + 2 * 384 * 1536 == 1_769_472


def test_flops_per_token_dense_plus_attention() -> None:
    dense = 12 * 2 * 1_769_472
    assert flops_per_token(GTE_SMALL, 1) == dense + 12 * 4 * 1 * 384
    assert flops_per_token(GTE_SMALL, 128) == dense + 12 * 4 * 128 * 384
    assert 42e6 < flops_per_token(GTE_SMALL, 128) < 45e6


def test_flops_for_lengths_sums_sequences() -> None:
    shape = BertShape(layers=1, hidden=2, heads=1, intermediate=4, vocab=10, positions=8)
    per_token = 2 * (4 * 2 * 2 + 2 * 2 * 4)  # 48
    assert flops_for_lengths(shape, [3]) == 3 * (per_token + 4 * 3 * 2)
    assert flops_for_lengths(shape, [3, 1]) == flops_for_lengths(shape, [3]) + flops_for_lengths(shape, [1])
    assert flops_for_lengths(shape, []) == 0


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_slope_of_a_line_and_of_flat_data() -> None:
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([0, 10, 20], [5, 5, 5]) == 0.0
    assert slope([1], [1]) == 0.0


def test_histogram_quantile_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.75)
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))


def test_budget_groups_sort_by_length_and_respect_the_budget() -> None:
    lengths = [100, 10, 500, 12, 11, 90]
    groups = budget_groups(lengths, budget=300, max_group=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 300
    assert groups[0] == [1, 4, 3]  # the short ones together; 4 x 90 would exceed 300
    assert [2] in groups  # over budget alone: a group of its own
    assert all(len(g) <= 2 for g in budget_groups(lengths, budget=10_000, max_group=2))


RESULT = {
    "started": "2024-01-01T00:00:00",
    "machine": {"cpu": "Test CPU", "cores": 2},
    "settings": {"model": "m", "embed_dtype": "float32"},
    "matmul": {"float32": {"size": 2048.0, "gflops": 100.0}},
    "raw": {
        "texts_per_s": 20.0,
        "fp32_fraction_of_bound": 0.5,
        "bf16_fraction_of_bound": 0.55,
        "variants": {
            "v": {"texts_per_s": 20.0, "tokens_per_s": 2000.0, "achieved_gflops": 50.0, "speedup": 1.0}
        },
    },
    "end_to_end": {"texts_per_s": 19.0, "ratio_to_raw": 0.95},
    "write_parts_ab": {"consumer on a core of its own, end to end / raw model on its core": 0.94},
    "remote": {"texts_per_s": 40.0, "direct_texts_per_s": 50.0, "ratio_to_direct": 0.8},
    "chunked": {"tokens_per_s": 9000.0, "raw_tokens_per_s": 10000.0, "ratio_to_raw": 0.9},
    "freshness": {"freshness_s": {"p50": 0.3, "p95": 0.8, "p99": 1.2}},
    "freshness_ab": {"rounds": 2.0, "before": {"p99": 1.2}, "p99_default_to_before": 0.4},
    "insert_latency": {
        "running": {"n": 3.0, "p50": 1.0, "p95": 2.0, "p99": 3.0},
        "p99_ratio": 1.05,  # co-located: shown, not the target
        "separate_p50_ratio": 1.02,
        "separate_p99_ratio": 1.5,
        "apart_p50_ratio": 1.01,
        "apart_p99_ratio": 1.05,
        "vector_writes_p50_ms": 0.2,
        "layout": "database and bench client on CPU [0], pipeline on [1]",
    },
    "memory": {"peak_bytes": 1.0 * 2**30, "final_bytes": 0.9 * 2**30, "cuda_library_bytes": 150 * 2**20},
}


def test_targets_pass_and_fail() -> None:
    by_name = {t["name"]: t["pass"] for t in targets(RESULT)}
    assert by_name == {
        "end-to-end / raw model texts/s": True,
        "end-to-end / raw model texts/s, the consumer on a core of its own": False,
        "model / fp32 matmul FLOP/s": False,
        "model as configured / bf16 matmul FLOP/s": True,
        "OpenVINO lossless / bf16 matmul FLOP/s": False,  # its phase did not run: not measured
        "freshness p99 at half load (s)": False,
        "insert p50 running / stopped, pipeline on other cores": True,
        "insert p99 running / stopped, pipeline on other cores": False,
        "insert p50 running / stopped, vectors in another database": True,
        "insert p99 running / stopped, vectors in another database": True,
        "chunked tokens/s / raw model on the same chunks": True,
        "consumer peak RSS (GB)": True,
        "remote path / the server's own texts/s": False,
    }
    assert not any(t["pass"] for t in targets({}))  # nothing measured: nothing passes


def test_render_markdown_from_a_fixed_result() -> None:
    text = render_markdown(RESULT)
    assert "**PASS** end-to-end / raw model texts/s: 0.95" in text
    assert "**FAIL** model / fp32 matmul FLOP/s: 0.5" in text
    assert "- cpu: Test CPU" in text
    assert "| float32 | 2048 | 100 |" in text
    assert "- peak RSS: 1024 MB" in text
    assert "- of it, CUDA libraries (the image's CPU-only torch has none): 150 MB" in text
    assert "- ratio_to_direct: 0.8" in text
    assert "- embed_dtype: float32" in text
    assert "- separate p99 ratio: 1.5" in text
    assert "- apart p99 ratio: 1.05" in text and "- vector writes p50 ms: 0.2" in text
    assert "- ratio_to_raw: 0.9" in text
    assert "- before: p99=1.2" in text and "- p99_default_to_before: 0.4" in text
    assert "- layout: database and bench client on CPU [0], pipeline on [1]" in text


def test_cuda_library_pages_are_counted_apart() -> None:
    smaps = [
        "7f00-7f10 r-xp 00000000 08:01 12 /venv/site-packages/nvidia/cublas/lib/libcublasLt.so.13\n",
        "Size:   4096 kB\n",
        "Rss:    1000 kB\n",
        "7f10-7f20 r-xp 00000000 08:01 13 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so\n",
        "Rss:    5000 kB\n",
        "7f20-7f30 rw-p 00000000 00:00 0\n",
        "Rss:    7000 kB\n",
        "7f30-7f40 r-xp 00000000 08:01 14 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so\n",
        "Rss:    24 kB\n",
    ]
    assert cuda_rss_of(smaps) == (1000 + 24) * 1024
