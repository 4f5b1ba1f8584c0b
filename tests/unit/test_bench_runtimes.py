"""The runtimes phase's retrieval measure and its targets in the report (no model loaded)."""

from __future__ import annotations

import math

import numpy as np

from consumer.bench.report import render_markdown, targets
from consumer.bench.runtimes import recall_at


def test_recall_counts_the_queries_whose_own_document_is_in_the_top_k() -> None:
    docs = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    assert recall_at(queries, docs, k=1) == 0.75  # query 1 finds document 2 first
    assert recall_at(queries, docs, k=4) == 1.0


def gate(cosine_min: float, drop: float) -> dict[str, float | bool]:
    return {
        "cosine_min": cosine_min,
        "cosine_mean": 0.999,
        "recall_at_10": 0.9,
        "recall_drop": drop,
        "pass": True,
    }


def test_a_runtimes_only_run_is_judged_on_its_own_targets() -> None:
    mode = {
        "texts_per_s": 1.0,
        "tokens_per_s": 1.0,
        "target": math.nan,
        "dtype": "int8",
        "identity": "m+int8",
    }
    result = {
        "scope": "runtimes",
        "runtimes": {
            "model": "m",
            "texts": 10,
            "batch": 64,
            "modes": {
                "openvino lossless": {**mode, "ratio_to_default": 1.4},
                "openvino int8": {**mode, "ratio_to_default": 2.4},
            },
            "quality": {
                "model": "stand-in",
                "docs": 5,
                "queries": 5,
                "query_words": 12,
                "fp32_recall": 0.9,
                "modes": {"openvino lossless": gate(0.9999, 0.0), "openvino int8": gate(0.985, 0.02)},
            },
        },
    }
    verdicts = {t["name"]: t["pass"] for t in targets(result)}
    assert verdicts == {
        "openvino lossless / torch texts/s": True,
        "openvino lossless: min cosine to fp32": True,
        "openvino lossless: recall@10 below fp32's": True,
        "openvino int8 / torch texts/s": False,
        "openvino int8: min cosine to fp32": False,
        "openvino int8: recall@10 below fp32's": False,
    }
    assert "| openvino int8 | 0.985 |" in render_markdown(result)


def test_a_full_run_without_the_runtimes_fails_their_targets_as_unmeasured() -> None:
    names = {t["name"]: t for t in targets({"runtimes": {}})}
    assert not names["openvino int8 / torch texts/s"]["pass"]
    assert "end-to-end / raw model texts/s" in names
