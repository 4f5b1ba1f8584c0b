"""Loading the model: offline, the default model fails at start with a message that says what to set."""

from __future__ import annotations

import pytest

from consumer.embedder import ModelLoadError, SentenceTransformerEmbedder, packaged_stand_in_model
from consumer.settings import DEFAULT_MODEL, Settings


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
