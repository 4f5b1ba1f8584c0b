"""consumer.chunking: window-sized chunks by the model's tokenizer, and the chunked pipeline over fakes.

The tokenizer here is a word-level one built in memory (one token a word, [CLS] and [SEP] around a
text), so a chunk's length in tokens is its word count plus two, and the tests need no model files.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import REGISTRY
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from consumer.chunking import Chunker, ChunkingEmbedder, with_chunking
from consumer.embedders.base import Embedding
from consumer.errors import OperatorError
from consumer.pipeline import BatchProcessor
from consumer.settings import Settings
from tests.unit.fakes import FakeEmbedder, FakePublisher, FakeSink, Topic, k, text_of, unit_vector

WINDOW = 12  # tokens the fake model reads, [CLS] and [SEP] included: 10 words


def word_tokenizer() -> Tokenizer:
    words = [f"w{i}" for i in range(200)] + ["."]
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tokenizer.post_processor = TemplateProcessing(  # type: ignore[assignment]
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tokenizer


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


class TokenizingFake(FakeEmbedder):
    """The fake model with a window and a tokenizer to lend, as the local backend has."""

    window = WINDOW

    def tokenizer(self) -> Tokenizer:
        return word_tokenizer()


def test_no_chunk_is_longer_than_the_window_and_the_chunks_cover_the_text() -> None:
    chunker = Chunker(word_tokenizer(), WINDOW, overlap=0)
    text = words(0, 95)
    chunks = chunker.split(text)
    assert chunker.capacity == WINDOW - 2
    assert all(len(word_tokenizer().encode(c).ids) <= WINDOW for c in chunks)
    assert " ".join(chunks) == text and len(chunks) == 10


def test_chunks_end_at_paragraphs_where_they_fit() -> None:
    text = f"{words(0, 6)}\n\n{words(6, 6)}\n\n{words(12, 3)}"
    # the second paragraph does not fit beside the first, the third does beside the second
    assert Chunker(word_tokenizer(), WINDOW, overlap=0).split(text) == [
        words(0, 6),
        f"{words(6, 6)}\n\n{words(12, 3)}",
    ]


def test_consecutive_chunks_overlap_by_at_most_the_setting() -> None:
    chunks = Chunker(word_tokenizer(), WINDOW, overlap=3).split(words(0, 40))
    for before, after in itertools.pairwise(chunks):
        shared = set(before.split()) & set(after.split())
        assert 1 <= len(shared) <= 3
    assert chunks[-1].split()[-1] == "w39"


def test_an_overlap_of_half_the_window_is_refused_naming_the_setting() -> None:
    with pytest.raises(OperatorError, match="CDC_CHUNK_OVERLAP_TOKENS=5"):
        Chunker(word_tokenizer(), WINDOW, overlap=5)


def test_a_short_text_is_one_chunk_and_blank_text_is_kept_as_it_is() -> None:
    chunker = Chunker(word_tokenizer(), WINDOW, overlap=2)
    assert chunker.split("w1 w2") == ["w1 w2"]
    assert chunker.split("  \n ") == ["  \n "]


def test_the_document_vector_is_the_normalised_mean_of_its_chunks() -> None:
    embedder = ChunkingEmbedder(FakeEmbedder(), Chunker(word_tokenizer(), WINDOW, overlap=0))
    long_text, short = words(0, 25), "w1 w2"
    embedding = embedder.embed([long_text, short])
    assert embedding.chunks is not None
    assert [len(c) for c in embedding.chunks] == [3, 1]
    mean = np.mean([unit_vector(c.text) for c in embedding.chunks[0]], axis=0)
    np.testing.assert_allclose(embedding.vectors[0], mean / np.linalg.norm(mean), rtol=1e-6)
    np.testing.assert_array_equal(embedding.vectors[1], unit_vector(short))
    assert [c.text for c in embedding.chunks[0]] == [words(0, 10), words(10, 10), words(20, 5)]


class RefusingEmbedder(FakeEmbedder):
    """A server that refuses one input on its own (a 400 for that input)."""

    def embed(self, texts: Sequence[str]) -> Embedding:
        embedding = super().embed(texts)
        refused = {i: "too many tokens" for i, t in enumerate(texts) if t == "w13"}
        return Embedding(embedding.vectors, embedding.tokens, 0, refused)


def test_a_refused_chunk_refuses_its_document_only() -> None:
    embedder = ChunkingEmbedder(RefusingEmbedder(), Chunker(word_tokenizer(), WINDOW, overlap=0))
    embedding = embedder.embed([f"{words(0, 10)}\n\nw13", "w1"])
    assert embedding.rejected == {0: "chunk refused: too many tokens"}
    assert embedding.chunks is not None and embedding.chunks[0] == () and len(embedding.chunks[1]) == 1


def test_chunking_needs_a_backend_that_lends_its_tokenizer() -> None:
    chunking = Settings(chunking="chunk", chunk_overlap_tokens=2)
    with pytest.raises(OperatorError, match="CDC_CHUNKING=truncate"):
        with_chunking(FakeEmbedder(), chunking)
    assert isinstance(with_chunking(TokenizingFake(), chunking), ChunkingEmbedder)
    plain = FakeEmbedder()
    assert with_chunking(plain, Settings()) is plain


def chunked_documents() -> float:
    value = REGISTRY.get_sample_value("cdc_embedder_chunked_documents_total", {"pipeline": "documents"})
    return value or 0.0


async def test_the_pipeline_replaces_a_documents_chunks_and_a_delete_removes_them() -> None:
    settings = Settings(chunking="chunk", chunk_overlap_tokens=0, max_text_chars=10_000)
    sink, topic = FakeSink(), Topic()
    processor = BatchProcessor(settings, with_chunking(TokenizingFake(), settings), sink, FakePublisher())
    before = chunked_documents()
    long_body = words(0, 30)
    report = await processor.process([topic.create(1, 10, "w100", long_body), topic.create(2, 11, "w101")])
    report.record_metrics()
    first = sink.chunks[k(1)]
    assert len(first) == 4 and " ".join(first).split() == text_of("w100", long_body).split()
    assert sink.chunks[k(2)] == (text_of("w101"),)
    assert chunked_documents() == before + 1
    await processor.process([topic.update(1, 20, "w100", words(50, 5))])
    assert sink.chunks[k(1)] == (text_of("w100", words(50, 5)),)
    await processor.process([topic.update(2, 30, "w101")])  # the same text: a touch keeps its chunks
    assert sink.chunks[k(2)] == (text_of("w101"),) and sink.rows[k(2)].position == 30
    await processor.process([topic.delete(1, 40)])
    assert k(1) not in sink.chunks and sink.rows[k(1)].deleted
