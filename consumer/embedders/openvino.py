"""The local backend on OpenVINO (`CDC_EMBED_RUNTIME=openvino`): the model exported to IR, lossless or int8.

Measured on a 2-core AMX machine (gte-small shape, batches of 16): torch fp32 29.8 texts/s, torch bf16 55,
OpenVINO at its default precision 89.4 (cosine 0.99998 to fp32), OpenVINO int8 164 (min cosine 0.993).
The embedder reproduces the torch backend's input exactly (same tokenizer, window, length-sorted groups
under the token budget, padding multiple) and its pooling (mean over the attention mask, normalised), so
the lossless IR keeps the model's identity while int8 is named apart (`Settings.model_identity`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consumer.embedders.base import Embedding, ModelLoadError
from consumer.embedders.local import PAD_TO_MULTIPLE_OF, budget_groups, clip_to_window
from consumer.embedders.openvino_export import IR_FILE, cache_folder, export_apart, read_meta
from consumer.settings import Settings, env_name

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

_PRECISIONS = {"auto": None, "float32": "f32", "bfloat16": "bf16"}
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class OpenVINOEmbedder:
    def __init__(self, settings: Settings) -> None:
        import openvino as ov

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
            export_apart(settings)
            meta = read_meta(folder)
            if meta is None:
                raise ModelLoadError(f"the OpenVINO export of {settings.model!r} left no model in {folder}")
        # The performance hint LATENCY: one stream over all threads, as the model thread calls it. No CPU
        # pinning: OpenVINO pins its threads to cores by their index, so every process pins to the same
        # ones (measured: two consumers of one thread each both on core 0 of two, at 0.56 of their speed
        # on a core each); the OS spreads them, and alone a process runs as fast unpinned.
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        if settings.torch_threads:
            config["INFERENCE_NUM_THREADS"] = settings.torch_threads
        if hint := _PRECISIONS[settings.embed_dtype]:
            config["INFERENCE_PRECISION_HINT"] = hint
        try:
            self._compiled = ov.Core().compile_model(folder / IR_FILE, "CPU", config)
            self._counting, self._feeding, self._pad_id = _tokenizers(folder)
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
        self._feeding.enable_truncation(self.window)
        self._inputs = [port.get_any_name() for port in self._compiled.inputs]
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: `search` or the bench may call from another thread
        self._batch_size = settings.batch_max_events
        self._token_budget = settings.embed_token_budget
        self._warm_up()

    def tokenizer(self) -> Tokenizer:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self._counting.to_str())

    def embed(self, texts: Sequence[str]) -> Embedding:
        texts = list(texts)
        if not texts:  # the tokenizer fails on no input
            return Embedding(np.empty((0, self.dimension), dtype=np.float32), 0, 0)
        lengths = [len(e.ids) for e in self._counting.encode_batch(texts)]
        tokens, truncated = clip_to_window(lengths, self.window)
        if self._token_budget > 0:
            groups = budget_groups(tokens, self._token_budget, self._batch_size)
        else:
            step = self._batch_size
            groups = [list(range(i, min(i + step, len(texts)))) for i in range(0, len(texts), step)]
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for group in groups:
            vectors[group] = self._forward([texts[i] for i in group])
        return Embedding(vectors, sum(tokens), truncated)

    def _forward(self, texts: list[str]) -> np.ndarray[Any, Any]:
        return self._infer(self._batch(self._feeding.encode_batch(texts)))

    def _infer(self, batch: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        with self._lock:
            hidden = self._request.infer({name: batch[name] for name in self._inputs})[0]
            # fp32 pooling, whatever the IR computed in: as sentence-transformers pools under autocast
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled: np.ndarray[Any, Any] = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        vectors: np.ndarray[Any, Any] = (pooled / norms).astype(np.float32)
        return vectors

    def _batch(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray[Any, Any]]:
        """The model's inputs as the torch backend's tokenizer call pads them: on the right, to a multiple
        of `_pad_multiple`, with the pad token and a zero mask."""
        longest = max(len(e.ids) for e in encodings)
        shape = (len(encodings), -(-longest // self._pad_multiple) * self._pad_multiple)
        batch = self._inputs_of(shape, mask=0)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            batch["input_ids"][row, :n] = encoding.ids
            batch["attention_mask"][row, :n] = 1
            batch["token_type_ids"][row, :n] = encoding.type_ids
        return batch

    def _inputs_of(self, shape: tuple[int, int], mask: int = 1) -> dict[str, np.ndarray[Any, Any]]:
        """Inputs of this shape, all pad tokens, the mask all `mask` (warm-up attends to every one)."""
        return {
            "input_ids": np.full(shape, self._pad_id, dtype=np.int64),
            "attention_mask": np.full(shape, mask, dtype=np.int64),
            "token_type_ids": np.zeros(shape, dtype=np.int64),
        }

    def _warm_up(self) -> None:
        """The first inference of each input shape runs ~30% slower (kernels made for it): pay that at
        load, for the padded lengths the token budget's groups take."""
        length = self._pad_multiple
        while length <= self.window:
            size = max(1, min(self._batch_size, self._token_budget // length if self._token_budget else 1))
            self._infer(self._inputs_of((size, length)))
            length *= 2


def _tokenizers(folder: Path) -> tuple[Tokenizer, Tokenizer, int]:
    """The export's fast tokenizer twice, one counting whole texts and one to cut for the model, and its
    pad id. The `tokenizers` core alone: transformers' AutoTokenizer imports torch (about 700 MB of RSS)
    into a process that never runs it."""
    from tokenizers import Tokenizer

    counting = Tokenizer.from_file(str(folder / "tokenizer.json"))
    counting.no_truncation()
    counting.no_padding()
    feeding = Tokenizer.from_str(counting.to_str())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    pad = config.get("pad_token")
    pad_token = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = counting.token_to_id(pad_token) if isinstance(pad_token, str) else None
    if pad_id is None:
        raise ModelLoadError(f"the tokenizer in {folder} names no pad token that it knows")
    return counting, feeding, pad_id
