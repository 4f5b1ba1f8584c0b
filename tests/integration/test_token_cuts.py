"""Chunks cut from one tokenization, against the model's real tokenizer and the library on the corpus's
longest texts (no stack: the tokenizer files and the corpus)."""

from __future__ import annotations

import json

import pytest

from consumer.bench.model import CORPUS
from consumer.chunking import Chunker
from consumer.embedders.local import counting_tokenizer, packaged_stand_in_model
from consumer.token_cuts import additive

WINDOW = 512


@pytest.fixture(scope="module")
def long_texts() -> list[str]:
    with CORPUS.open() as f:
        texts = [json.loads(line)["text"] for line in f]
    return sorted(texts, key=len, reverse=True)[:40]


def real_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return counting_tokenizer(AutoTokenizer.from_pretrained(str(packaged_stand_in_model())))


def test_without_overlap_the_chunks_are_the_librarys_own(long_texts: list[str]) -> None:
    """The same cut points as semantic-text-splitter, found from one tokenization instead of many."""
    from semantic_text_splitter import TextSplitter

    tokenizer = real_tokenizer()
    assert additive(tokenizer)  # the fast path, unchecked, is what runs on gte-small's tokenizer family
    chunker = Chunker(tokenizer, WINDOW, overlap=0)
    library = TextSplitter.from_huggingface_tokenizer(tokenizer, chunker.capacity)
    assert chunker.split_all(long_texts) == library.chunk_all(long_texts)


@pytest.mark.parametrize("overlap", [8, 32])
def test_overlapping_chunks_fit_the_window_and_share_at_most_the_overlap(
    long_texts: list[str], overlap: int
) -> None:
    tokenizer = real_tokenizer()
    shared: list[int] = []
    for text, chunks in zip(
        long_texts, Chunker(tokenizer, WINDOW, overlap).split_all(long_texts), strict=True
    ):
        assert max(len(tokenizer.encode(c).ids) for c in chunks) <= WINDOW and len(chunks) > 1
        position, end = 0, 0
        for chunk in chunks:
            position = text.index(chunk, position)  # in order, each after the one before
            shared.append(len(tokenizer.encode(text[position:end], add_special_tokens=False).ids))
            position, end = position + 1, position + len(chunk)
        assert end == len(text.rstrip())
    assert 0 < max(shared) <= overlap
