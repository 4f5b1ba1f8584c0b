"""The openai backend against a real OpenAI-compatible server (infinity-emb serving the stand-in model):
the same vectors as the local model, a wrong key held as an operator error, and the real consumer end
to end through Debezium with CDC_EMBEDDER=openai."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from consumer.consumer_process import READINESS_PATH, ConsumerProcess, wait_until
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.embedders.openai import OpenAIEmbedder, OpenAIEmbedderSpec, identity
from consumer.errors import EmbedderConfigError
from consumer.events import join_text
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.harness import cli, corpus_rows, insert_rows, wait_consistent
from tests.infinity import API_KEY, DIMENSION, InfinityServer, openai_env, own_dead_letters

pytestmark = pytest.mark.integration


def spec(infinity: InfinityServer, settings: Settings, **overrides: Any) -> OpenAIEmbedderSpec:
    given = {"model": settings.model, "base_url": infinity.base_url, "api_key": API_KEY, **overrides}
    return OpenAIEmbedderSpec.model_validate(given)


@pytest.fixture(scope="module")
def local(settings: Settings) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(settings.model_copy(update={"embed_dtype": "float32"}))


def texts(n: int, skip: int) -> list[str]:
    return [join_text(r, ("title", "body"))[:600] for r in corpus_rows(n, skip=skip)]


def test_the_server_gives_the_local_models_vectors_over_several_concurrent_requests(
    infinity: InfinityServer, settings: Settings, local: SentenceTransformerEmbedder
) -> None:
    remote = OpenAIEmbedder(spec(infinity, settings, max_inputs_per_request=5, concurrency=3))
    try:
        assert remote.dimension == DIMENSION  # probed: no CDC_OPENAI_DIMENSIONS given
        sample = texts(24, skip=56_000)
        got = remote.embed(sample)
    finally:
        remote.close()
    assert not got.rejected and got.tokens > 0
    cosines = np.sum(got.vectors * local.embed(sample).vectors, axis=1)
    assert cosines.min() > 0.999


def test_a_wrong_key_is_an_operator_error_naming_the_setting(
    infinity: InfinityServer, settings: Settings
) -> None:
    remote = OpenAIEmbedder(spec(infinity, settings, api_key="expired", dimensions=DIMENSION))
    try:
        with pytest.raises(EmbedderConfigError) as caught:
            remote.embed(["hello"])
    finally:
        remote.close()
    assert "401" in str(caught.value) and "CDC_OPENAI_API_KEY" in caught.value.fix


def test_the_consumer_embeds_through_the_server_end_to_end(
    stack: LocalStack,
    env: dict[str, str],
    infinity: InfinityServer,
    db: psycopg.Connection[Any],
    logs_dir: Path,
    local: SentenceTransformerEmbedder,
) -> None:
    # no declared dimension, as for servers that take no `dimensions`: the consumer asks the server
    remote_env = openai_env(env, infinity.base_url, API_KEY, "embeddings_openai")
    del remote_env["CDC_OPENAI_DIMENSIONS"]
    remote_settings = Settings.from_env_map(remote_env)
    rows = corpus_rows(40, skip=57_000, id_base=7_100_000)
    consumer = ConsumerProcess(remote_env, logs_dir / "openai.log").start().wait_ready()
    try:
        insert_rows(db, rows)
        model = identity(remote_settings.openai_spec(), DIMENSION)
        wait_consistent(db, remote_settings, [r["id"] for r in rows], model=model)
        assert own_dead_letters(consumer) == 0
        assert consumer.metric_sum("cdc_embedder_embed_requests_total", status="200") > 0
        assert consumer.metric_sum("cdc_embedder_tokens_billed_total") > 0
    finally:
        assert consumer.stop() == 0
    stored = dict(
        db.execute(
            "SELECT id, embedding::real[] FROM public.embeddings_openai WHERE id = ANY(%s) ORDER BY id",
            ([r["id"] for r in rows],),
        ).fetchall()
    )
    assert {m for (m,) in db.execute("SELECT DISTINCT model FROM public.embeddings_openai")} == {model}
    ordered = sorted(rows, key=lambda r: r["id"])
    expected = local.embed([join_text(r, ("title", "body")) for r in ordered]).vectors
    got = np.array([stored[r["id"]] for r in ordered], dtype=np.float32)
    assert np.sum(got * expected, axis=1).min() > 0.999
    # the CLI knows the identity the consumer learnt from the server (it reads what the table recorded):
    # none of these vectors is of a wrong model (the table may still lack rows of other tests)
    audited = cli(remote_env, "audit")
    [line] = [line for line in audited.stdout.splitlines() if line.startswith("wrong_model")]
    assert line.split()[1] == "0", audited.stdout + audited.stderr


def test_a_wrong_key_makes_the_consumer_not_ready_and_dead_letters_nothing(
    stack: LocalStack,
    env: dict[str, str],
    infinity: InfinityServer,
    db: psycopg.Connection[Any],
    logs_dir: Path,
) -> None:
    consumer = ConsumerProcess(
        openai_env(env, infinity.base_url, "expired", "embeddings_wrong_key"), logs_dir / "key.log"
    )
    consumer.start()
    try:
        insert_rows(db, corpus_rows(3, skip=57_100, id_base=7_200_000))
        wait_until(lambda: "CDC_OPENAI_API_KEY" in consumer.log_file.read_text(), 180, "the fix to be logged")
        assert consumer.probe(READINESS_PATH) == 503
        assert consumer.metric_sum("cdc_embedder_dead_letters_total") == 0
        assert consumer.metric_sum("cdc_embedder_retries_total") == 0
    finally:
        assert consumer.stop() == 0
