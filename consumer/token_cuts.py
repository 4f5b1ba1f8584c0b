"""Chunks of long texts cut from one tokenization of the whole text.

semantic-text-splitter counts a candidate chunk by tokenizing it and finds each chunk by a search over
candidates, so a long text is tokenized about twelve times over: 0.52 s for the corpus's 20 longest
texts, 9% of the time the model then takes for their chunks. Here a text is tokenized once, with offsets,
and a chunk is the text between two cut points. Its tokens are then exactly the text's tokens between
them when the tokenizer reads each pre-tokenized word on its own (`additive`: WordPiece or word-level
models after a whitespace-splitting pre-tokenizer, with BERT's per-character normalizer; gte-small's
and MiniLM's tokenizers are such). For any other tokenizer each chunk is counted again, and a text with
a chunk that does not fit is left to the library (`None`).

Cut points are ranked as the library ranks its levels: a blank line over a line break over a sentence's
end over a space over a word boundary without a space (a word and its punctuation); inside a word, only
as the library would, so such a text is left to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

INSIDE, WORD, SPACE, SENTENCE, LINE, PARAGRAPH = range(-1, 5)
SENTENCE_ENDS = np.array([ord(c) for c in ".!?"], dtype=np.uint32)
_WORD_MODELS = {"WordPiece", "WordLevel"}
_WHITESPACE_SPLITTING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_PER_CHARACTER = {"BertNormalizer", "Lowercase"}


def additive(tokenizer: Tokenizer) -> bool:
    """Whether a chunk cut between two words tokenizes to the whole text's tokens between them."""
    spec = json.loads(tokenizer.to_str())

    def types(part: dict[str, Any] | None, members: str) -> list[str]:
        if part is None:
            return []
        return [p["type"] for p in part[members]] if part["type"] == "Sequence" else [part["type"]]

    pre = types(spec["pre_tokenizer"], "pretokenizers")
    return (
        spec["model"]["type"] in _WORD_MODELS
        and bool(pre)
        and set(pre) <= _WHITESPACE_SPLITTING
        and set(types(spec["normalizer"], "normalizers")) <= _PER_CHARACTER
    )


class TokenCuts:
    """Chunks of at most `capacity` tokens sharing at most `overlap` with the chunk before."""

    def __init__(self, tokenizer: Tokenizer, capacity: int, overlap: int) -> None:
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # a text's tokens would stop at the truncation, and chunks past it would vanish unseen
            raise ValueError(
                "chunks are cut by a tokenizer that counts whole texts: no truncation, no padding"
            )
        self._tokenizer, self._capacity, self._overlap = tokenizer, capacity, overlap
        self.exact = additive(tokenizer)

    def chunk_all(self, texts: Sequence[str]) -> list[list[str] | None]:
        """Each text's chunks ([] for a text without tokens), or None where the library must cut it."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        chunks = [self._chunks(text, e) for text, e in zip(texts, encodings, strict=True)]
        if self.exact:
            return chunks
        pieces = [piece for cut in chunks if cut is not None for piece in cut]
        counted = self._tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
        lengths = iter(len(e.ids) for e in counted)
        checked: list[list[str] | None] = []
        for cut in chunks:
            fits = cut is not None and max((next(lengths) for _ in cut), default=0) <= self._capacity
            checked.append(cut if fits else None)
        return checked

    def _chunks(self, text: str, encoding: Encoding) -> list[str] | None:
        n = len(encoding.ids)
        if n == 0:
            return []
        offsets = np.asarray(encoding.offsets, dtype=np.int64)
        starts, ends = offsets[:, 0], offsets[:, 1]
        if n <= self._capacity:
            return [text[starts[0] : ends[-1]]]
        levels = cut_levels(text, starts, ends, encoding.word_ids)
        chunks: list[str] = []
        start, previous_end = 0, 0
        while True:
            if n - start <= self._capacity:
                end = n
            else:
                # a cut before token i, for i in [low, high]; past the previous chunk's end, so an
                # overlapping chunk always reaches further than the one before
                low, high = max(start, previous_end) + 1, start + self._capacity
                window = levels[low : high + 1]
                best = window.max()
                if best == INSIDE:
                    return None
                end = low + int(np.flatnonzero(window == best)[-1])
            chunks.append(text[starts[start] : ends[end - 1]])
            if end == n:
                return chunks
            start, previous_end = self._next_start(levels, start, end), end

    def _next_start(self, levels: np.ndarray, start: int, end: int) -> int:
        """The overlap's start: the best-ranked cut at most `overlap` tokens before `end`, the earliest
        of its rank."""
        low = max(end - self._overlap, start + 1)
        window = levels[low:end]
        if window.size == 0 or window.max() == INSIDE:
            return end
        return low + int(np.flatnonzero(window == window.max())[0])


def cut_levels(text: str, starts: np.ndarray, ends: np.ndarray, word_ids: list[int | None]) -> np.ndarray:
    """The rank of a cut before each token (the first has none: INSIDE)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    newlines_before = np.concatenate(([0], np.cumsum(codes == ord("\n"))))
    words = np.array([-1 if w is None else w for w in word_ids])
    new_word = words[1:] != words[:-1]
    gap = new_word & (starts[1:] > ends[:-1])  # characters the tokenizer skips: white space
    newlines = np.where(gap, newlines_before[starts[1:]] - newlines_before[ends[:-1]], 0)
    sentence = gap & np.isin(codes[ends[:-1] - 1], SENTENCE_ENDS)
    level = np.select(
        [newlines >= 2, newlines == 1, sentence, gap, new_word],
        [PARAGRAPH, LINE, SENTENCE, SPACE, WORD],
        INSIDE,
    )
    return np.concatenate(([INSIDE], level))
