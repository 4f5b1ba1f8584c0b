"""What every embedding backend provides, and the failures it may raise, so the pipeline treats a local
model and a remote API alike.

The protocol stays blocking: the pipeline calls `embed` in its model thread under the CDC_MODEL_TIMEOUT_S
watchdog, and `search`, `demo` and the bench call it directly. A remote backend keeps several requests in
flight inside one call on a small thread pool of its own (I/O threads, not an event loop in a thread).

Failures are typed so that the pipeline does not have to guess from an exception's text:
- `Backpressure`: the server asks us to slow down (429). Wait its retry-after and send the same texts
  again; never route records and never split the batch for it.
- `TransientEmbedError`: 5xx, timeouts, connection resets. Retry the same texts with backoff in place.
- `EmbedderConfigError`: a key, model or dimension is wrong. Hold the batch for an operator.
- `Embedding.rejected`: inputs the server refused on their own (400 for that input alone): only those are
  dead-lettered, with the server's reason; the others have vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

# The failures live with the one classifier (consumer.errors), which decides what each means.
from consumer.errors import Backpressure, EmbedderConfigError, OperatorError, TransientEmbedError

__all__ = [
    "Backpressure",
    "Chunk",
    "Embedder",
    "EmbedderConfigError",
    "Embedding",
    "ModelLoadError",
    "TransientEmbedError",
    "Vector",
    "Vectors",
]

Vectors = npt.NDArray[np.float32]
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One window-sized piece of a long text (CDC_CHUNKING=chunk) and its vector."""

    text: str
    vector: Vector


@dataclass(frozen=True, slots=True)
class Embedding:
    vectors: Vectors  # (n, dimension), L2-normalised; rows of rejected inputs are zeros
    tokens: int  # tokens fed to the model, after truncation (a remote API: the tokens it billed)
    truncated: int  # texts cut at the model window
    # index of an input the server refused on its own -> the server's reason
    rejected: Mapping[int, str] = field(default_factory=dict)
    # chunked embedding: each input's chunks, in order (empty for a rejected input); `vectors` then holds
    # each input's document vector, the normalised mean of its chunks' vectors
    chunks: tuple[tuple[Chunk, ...], ...] | None = None


class Embedder(Protocol):
    # one identity per embedder: the `model` column and part of the text hash, so two backends (or two
    # dimensions of one model) never pass for each other
    name: str
    dimension: int
    dtype: str  # what the model computes in: "float32" or "bfloat16" ("remote" for an API)

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Blocking; the consumer calls it from a worker thread."""
        ...


class ModelLoadError(OperatorError):
    """The configured model could not be loaded; the message says which setting to change."""
