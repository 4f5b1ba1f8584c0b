"""Pure arithmetic of the bench: FLOPs of a BERT encoder, percentiles, slopes. No torch, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class BertShape:
    layers: int = 12
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    vocab: int = 30522
    positions: int = 512

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


GTE_SMALL = BertShape()


def matmul_params_per_layer(shape: BertShape) -> int:
    """Weights a token is multiplied with in one layer: Q, K, V, attention output, and the two FFN ones."""
    return 4 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.intermediate


def flops_per_token(shape: BertShape, seq_len: int) -> int:
    """Multiply-adds x 2 for one token of a sequence of `seq_len` tokens, through all layers.

    Dense part: 2 x the matmul weights. Attention: Q.K^T and softmax(..).V each cost 2 x seq_len x hidden
    per token (summed over heads). Embedding lookups, layer norms, softmax and pooling are ignored.
    """
    dense = 2 * matmul_params_per_layer(shape)
    attention = 4 * seq_len * shape.hidden
    return shape.layers * (dense + attention)


def flops_for_lengths(shape: BertShape, lengths: Iterable[int]) -> int:
    """Useful FLOPs to encode sequences of these token lengths (padding excluded)."""
    return sum(n * flops_per_token(shape, n) for n in lengths)


def matmul_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs; 0 for fewer than two points."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    if len(xs) < 2:
        return 0.0
    mean_x = sum(xs) / len(xs)
    mean_y = sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets, +Inf last."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound
