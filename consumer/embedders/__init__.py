"""Embedding backends behind one protocol (`base.Embedder`): `local` (sentence-transformers on this
machine, run by torch or OpenVINO) and `openai` (any OpenAI-compatible server). `build_embedder` picks one
from the settings."""

from __future__ import annotations

import logging

from consumer.embedders.base import Embedder, ModelLoadError
from consumer.settings import Settings, env_name

log = logging.getLogger(__name__)


def build_embedder(settings: Settings) -> Embedder:
    """The embedder CDC_EMBEDDER names; imported lazily, so the openai backend never loads torch."""
    if settings.embedder == "openai":
        from consumer.embedders.openai import OpenAIEmbedder

        return OpenAIEmbedder(settings.openai_spec())
    from consumer.embedders.local import SentenceTransformerEmbedder

    if settings.embed_runtime == "torch":
        return SentenceTransformerEmbedder(settings)
    try:
        from consumer.embedders.openvino import OpenVINOEmbedder

        return OpenVINOEmbedder(settings)
    except (ImportError, ModelLoadError) as exc:
        if settings.embed_runtime == "openvino":
            raise
        # auto: the model's own vectors either way (the lossless export is the same identity), so torch
        # serves a model OpenVINO cannot take, at its speed and memory
        skip = f"{env_name('embed_runtime')}=torch"
        log.warning("%s runs on torch: %s (%s skips this attempt)", settings.model, exc, skip)
        return SentenceTransformerEmbedder(settings)
