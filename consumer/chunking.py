"""Long texts cut into window-sized chunks (CDC_CHUNKING=chunk) instead of cut off at the window.

The cutting is semantic-text-splitter's: it splits at the largest natural boundary that still fits
(paragraphs, then sentences, then words) and counts with the model's own tokenizer, so no chunk is cut
by the model again. Chosen over semchunk (the same idea, in Python) for its speed and for taking a
Hugging Face tokenizer as it is; it has no dependencies. Where the tokenizer reads each word on its own
(gte-small's family), `token_cuts` finds the same cut points from one tokenization of the text, 3 to 5
times faster (the library tokenizes each candidate chunk); the library cuts the rest.

The embedding of a document is then its chunks' vectors plus one document vector, their normalised
mean: the vector table keeps one vector per document (what the search view and the lifecycle
operations read) and the chunk table one per chunk (what `search` ranks by).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeGuard

import numpy as np

from consumer.embedders.base import Chunk, Embedder, Embedding
from consumer.errors import OperatorError
from consumer.settings import Settings, env_name
from consumer.token_cuts import TokenCuts

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class Tokenizing(Protocol):
    """A backend that reads at most `window` tokens (special tokens included) and lends its tokenizer."""

    window: int

    def tokenizer(self) -> Tokenizer: ...


class TokenizingEmbedder(Embedder, Tokenizing, Protocol): ...


class Chunker:
    def __init__(self, tokenizer: Tokenizer, window: int, overlap: int) -> None:
        from semantic_text_splitter import TextSplitter

        # the splitter counts a chunk's own tokens; the model adds its special ones ([CLS], [SEP])
        specials = len(tokenizer.encode("", add_special_tokens=True).ids)
        self.capacity = window - specials
        if 2 * overlap >= self.capacity:
            raise OperatorError(
                f"{env_name('chunk_overlap_tokens')}={overlap} must be under half of the model's window "
                f"({self.capacity} tokens of text): set it lower"
            )
        self._splitter = TextSplitter.from_huggingface_tokenizer(tokenizer, self.capacity, overlap=overlap)
        self._cuts = TokenCuts(tokenizer, self.capacity, overlap)

    def split(self, text: str) -> list[str]:
        """The text's chunks, in order. A text of white space only is one chunk, as in truncate mode."""
        return self.split_all([text])[0]

    def split_all(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's chunks: cut from one tokenization of it where the tokenizer allows, else by the
        library."""
        cut = self._cuts.chunk_all(texts)
        left = [i for i, chunks in enumerate(cut) if chunks is None]
        for i, chunks in zip(left, self._splitter.chunk_all([texts[i] for i in left]), strict=True):
            cut[i] = chunks
        return [chunks or [text] for text, chunks in zip(texts, cut, strict=True)]


class ChunkingEmbedder:
    """An `Embedder` that embeds each text as its chunks; `Embedding.chunks` holds them."""

    def __init__(self, embedder: Embedder, chunker: Chunker) -> None:
        self._embedder, self._chunker = embedder, chunker
        self.name, self.dimension, self.dtype = embedder.name, embedder.dimension, embedder.dtype

    def embed(self, texts: Sequence[str]) -> Embedding:
        pieces = self._chunker.split_all(texts)
        inner = self._embedder.embed([piece for chunks in pieces for piece in chunks])
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        chunks: list[tuple[Chunk, ...]] = []
        rejected: dict[int, str] = {}
        start = 0
        for index, texts_of_doc in enumerate(pieces):
            end = start + len(texts_of_doc)
            refused = [inner.rejected[i] for i in range(start, end) if i in inner.rejected]
            if refused:
                # a document is searchable whole or not at all
                rejected[index] = f"chunk refused: {refused[0]}"
                chunks.append(())
            else:
                rows = inner.vectors[start:end]
                mean = rows.mean(axis=0)
                vectors[index] = mean / np.linalg.norm(mean)
                chunks.append(tuple(Chunk(t, v) for t, v in zip(texts_of_doc, rows, strict=True)))
            start = end
        return Embedding(vectors, inner.tokens, inner.truncated, rejected, tuple(chunks))


def with_chunking(embedder: Embedder, settings: Settings) -> Embedder:
    """The pipeline's embedder: chunking if CDC_CHUNKING=chunk, else as it is (one window per text)."""
    if settings.chunking != "chunk":
        return embedder
    if not _tokenizing(embedder):
        raise OperatorError(
            f"the {type(embedder).__name__} backend does not lend its tokenizer: "
            f"set {env_name('chunking')}=truncate"
        )
    chunker = Chunker(embedder.tokenizer(), embedder.window, settings.chunk_overlap_tokens)
    return ChunkingEmbedder(embedder, chunker)


def _tokenizing(embedder: Embedder) -> TypeGuard[TokenizingEmbedder]:
    window, tokenizer = getattr(embedder, "window", None), getattr(embedder, "tokenizer", None)
    return isinstance(window, int) and callable(tokenizer)
