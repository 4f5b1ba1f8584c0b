"""Embedding backends behind one protocol (`base.Embedder`): `local` (sentence-transformers on this
machine, run by torch or OpenVINO) and `openai` (any OpenAI-compatible server). `build_embedder` picks one
from the settings."""

from __future__ import annotations

from consumer.embedders.base import Embedder
from consumer.settings import Settings


def build_embedder(settings: Settings) -> Embedder:
    """The embedder CDC_EMBEDDER names; imported lazily, so the openai backend never loads torch."""
    if settings.embedder == "openai":
        from consumer.embedders.openai import OpenAIEmbedder

        return OpenAIEmbedder(settings.openai_spec())
    if settings.embed_runtime == "openvino":
        from consumer.embedders.openvino import OpenVINOEmbedder

        return OpenVINOEmbedder(settings)
    from consumer.embedders.local import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(settings)
