"""consumer.token_cuts: chunks from one tokenization, and the library where that is not exact.

The tokenizers are built in memory (see tests/unit/test_chunking.py's word-level one)."""

from __future__ import annotations

import pytest
from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer, normalizers
from tokenizers.models import WordPiece
from tokenizers.pre_tokenizers import BertPreTokenizer

from consumer.chunking import Chunker
from consumer.token_cuts import TokenCuts, additive
from tests.unit.test_chunking import WINDOW, word_tokenizer, words


def test_a_sentences_end_beats_a_later_space() -> None:
    text = f"{words(0, 7)}. {words(7, 6)}"
    # the window holds 10 tokens: the cut after "." (token 8) is taken over one two words later
    assert Chunker(word_tokenizer(), WINDOW, overlap=0).split(text) == [f"{words(0, 7)}.", words(7, 6)]


def test_a_line_break_beats_a_sentences_end() -> None:
    text = f"{words(0, 3)}\n{words(3, 3)}. {words(6, 6)}"
    assert Chunker(word_tokenizer(), WINDOW, overlap=0).split(text) == [
        words(0, 3),
        f"{words(3, 3)}. {words(6, 6)}",
    ]


def test_a_tokenizer_that_is_not_additive_has_its_chunks_counted_and_the_library_cuts_what_does_not_fit() -> (
    None
):
    tokenizer = word_tokenizer()
    # every text read gets a word in front: a chunk costs one token more than its share of the text
    tokenizer.normalizer = normalizers.Prepend("w199 ")  # type: ignore[assignment]
    assert not additive(tokenizer) and additive(word_tokenizer())
    text = words(0, 40)
    assert TokenCuts(tokenizer, WINDOW - 2, overlap=0).chunk_all([text, "w1 w2"]) == [None, ["w1 w2"]]
    chunks = Chunker(tokenizer, WINDOW, overlap=0).split(text)
    assert chunks == TextSplitter.from_huggingface_tokenizer(tokenizer, WINDOW - 2).chunks(text)
    assert max(len(tokenizer.encode(c).ids) for c in chunks) <= WINDOW


def test_a_word_longer_than_the_window_is_left_to_the_library() -> None:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "##a": 4, "b": 5}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = BertPreTokenizer()  # type: ignore[assignment]
    text = "b " + "a" * 25 + " b"
    assert additive(tokenizer)
    assert TokenCuts(tokenizer, 10, overlap=0).chunk_all([text]) == [None]
    assert Chunker(tokenizer, 10, overlap=0).split(text) == TextSplitter.from_huggingface_tokenizer(
        tokenizer, 10
    ).chunks(text)


def test_a_tokenizer_that_truncates_is_refused_since_the_rest_of_a_text_would_vanish() -> None:
    tokenizer = word_tokenizer()
    tokenizer.enable_truncation(8)
    with pytest.raises(ValueError, match="no truncation"):
        TokenCuts(tokenizer, WINDOW - 2, overlap=0)
