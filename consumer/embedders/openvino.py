"""The local backend on OpenVINO (`CDC_EMBED_RUNTIME=openvino`): the model exported to IR, lossless or int8.

Measured on a 2-core AMX machine (gte-small shape, batches of 16): torch fp32 29.8 texts/s, torch bf16 55,
OpenVINO at its default precision 89.4 (cosine 0.99998 to fp32), OpenVINO int8 164 (min cosine 0.993).
The embedder reproduces the torch backend's input exactly (same tokenizer, window, length-sorted groups
under the token budget, padding multiple) and its pooling (mean over the attention mask, normalised), so
the lossless IR keeps the model's identity while int8 is named apart (`Settings.model_identity`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from consumer.embedders.base import Embedding, ModelLoadError
from consumer.embedders.local import PAD_TO_MULTIPLE_OF, budget_groups, counting_tokenizer, window_tokens
from consumer.embedders.openvino_export import IR_FILE, cache_folder, export, read_meta
from consumer.settings import Settings, env_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)
_PRECISIONS = {"auto": None, "float32": "f32", "bfloat16": "bf16"}
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class OpenVINOEmbedder:
    def __init__(self, settings: Settings) -> None:
        import openvino as ov
        from transformers import AutoTokenizer

        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
        self.name = settings.model_identity
        folder = cache_folder(settings)
        meta = read_meta(folder)
        if meta is None:
            if settings.embed_quantization == "int8":
                raise ModelLoadError(
                    f"no int8 OpenVINO model of {settings.model!r} in {folder}: quantize it first, on texts "
                    "like yours, with `cdc-embedder openvino-export --quantization int8 --calibration FILE` "
                    f"(same {env_name('model')} and {env_name('openvino_cache_dir')})"
                )
            log.info("exporting %s to OpenVINO IR in %s (first use)", settings.model, folder)
            export(settings)
            meta = read_meta(folder)
            if meta is None:
                raise ModelLoadError(f"the OpenVINO export of {settings.model!r} left no model in {folder}")
        # The performance hint LATENCY: one stream over all threads, as the model thread calls it.
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if settings.torch_threads:
            config["INFERENCE_NUM_THREADS"] = settings.torch_threads
        if hint := _PRECISIONS[settings.embed_dtype]:
            config["INFERENCE_PRECISION_HINT"] = hint
        try:
            self._compiled = ov.Core().compile_model(folder / IR_FILE, "CPU", config)
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the OpenVINO model in {folder} ({exc}): delete the folder to export it again, "
                f"or set {env_name('embed_runtime')}=torch"
            ) from exc
        precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.dtype = "int8" if settings.embed_quantization == "int8" else _DTYPES.get(precision, precision)
        self.dimension = int(meta["dimension"])
        self.window = min(settings.max_seq_length, int(meta["max_seq_length"]))
        # the tokenizer refuses a padding multiple that does not divide the window
        self._pad_multiple = math.gcd(PAD_TO_MULTIPLE_OF, self.window)
        self._inputs = [port.get_any_name() for port in self._compiled.inputs]
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: `search` or the bench may call from another thread
        self._batch_size = settings.batch_max_events
        self._token_budget = settings.embed_token_budget
        self._warm_up()

    def tokenizer(self) -> Tokenizer:
        return counting_tokenizer(self._tokenizer)

    def embed(self, texts: Sequence[str]) -> Embedding:
        texts = list(texts)
        if not texts:  # the tokenizer fails on no input
            return Embedding(np.empty((0, self.dimension), dtype=np.float32), 0, 0)
        tokens, truncated = window_tokens(self._tokenizer, texts, self.window)
        if self._token_budget > 0:
            groups = budget_groups(tokens, self._token_budget, self._batch_size)
        else:
            step = self._batch_size
            groups = [list(range(i, min(i + step, len(texts)))) for i in range(0, len(texts), step)]
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for group in groups:
            vectors[group] = self._forward([texts[i] for i in group])
        return Embedding(vectors, sum(tokens), truncated)

    def _forward(self, texts: list[str], length: int | None = None) -> np.ndarray[Any, Any]:
        padding: dict[str, Any] = (
            {"padding": "max_length", "max_length": length}
            if length
            else {"padding": True, "max_length": self.window, "pad_to_multiple_of": self._pad_multiple}
        )
        batch = self._tokenizer(texts, truncation=True, return_tensors="np", **padding)
        with self._lock:
            hidden = self._request.infer({name: batch[name] for name in self._inputs})[0]
            # fp32 pooling, whatever the IR computed in: as sentence-transformers pools under autocast
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled: np.ndarray[Any, Any] = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        vectors: np.ndarray[Any, Any] = (pooled / norms).astype(np.float32)
        return vectors

    def _warm_up(self) -> None:
        """The first inference of each input shape runs ~30% slower (kernels made for it): pay that at
        load, for the padded lengths the token budget's groups take."""
        length = self._pad_multiple
        while length <= self.window:
            size = max(1, min(self._batch_size, self._token_budget // length if self._token_budget else 1))
            self._forward(["warm up " * length] * size, length=length)
            length *= 2
