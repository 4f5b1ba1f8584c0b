"""Loading the model: offline, the default model fails at start with a message that says what to set."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.embedders.base import ModelLoadError
from consumer.embedders.local import SentenceTransformerEmbedder, packaged_stand_in_model
from consumer.settings import DEFAULT_MODEL, Settings
from tests.harness import corpus_rows


def test_default_model_without_a_hub_names_the_setting_and_the_offline_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as failure:
        SentenceTransformerEmbedder(Settings.model_validate({"model": DEFAULT_MODEL}))
    message = str(failure.value)
    assert "CDC_MODEL" in message and DEFAULT_MODEL in message
    assert str(packaged_stand_in_model()) in message


def test_stand_in_model_embeds_normalised_384_dimension_vectors() -> None:
    embedder = SentenceTransformerEmbedder(
        Settings.model_validate({"model": str(packaged_stand_in_model()), "max_seq_length": 16})
    )
    embedding = embedder.embed(["a short text", "word " * 200])
    assert embedder.dimension == 384
    assert embedding.vectors.shape == (2, 384)
    assert abs(float((embedding.vectors**2).sum(axis=1).max()) - 1.0) < 1e-4
    assert embedding.truncated == 1 and embedding.tokens == 16 + 5


def test_bf16_vectors_match_fp32_on_corpus_texts() -> None:
    """The quality gate of `make bench`, small: bf16 stays within cosine 0.99 of fp32, same neighbours."""
    texts = [row["body"] for row in corpus_rows(50, skip=45_000)]
    vectors = {
        dtype: SentenceTransformerEmbedder(
            Settings.model_validate({"model": str(packaged_stand_in_model()), "embed_dtype": dtype})
        )
        .embed(texts)
        .vectors
        for dtype in ("float32", "bfloat16")
    }
    fp32, bf16 = vectors["float32"], vectors["bfloat16"]
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(fp32, bf16)  # bf16 was really computed, not fp32 under another name
    assert float((fp32 * bf16).sum(axis=1).min()) >= 0.99
    queries = slice(0, 10)  # each of the first texts as a query against all the others
    nearest = [np.argsort(-(v[queries] @ v.T), axis=1, kind="stable")[:, 1] for v in (fp32, bf16)]
    assert (nearest[0] == nearest[1]).all()
