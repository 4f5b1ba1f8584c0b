"""The remote path: the pipeline with the openai backend against an OpenAI-compatible server (infinity-emb
serving the gte-small-shaped model), as a ratio to that server's own throughput when the backend's client
sends it the same batches directly, measured right before and right after the pipeline's run on the same
texts (as the local path is judged against the raw model beside it)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.bench import model as bm
from consumer.bench.flops import GTE_SMALL
from consumer.bench.phases import bulk_throughput
from consumer.consumer_process import ConsumerProcess
from consumer.embedders.openai import OpenAIEmbedder, OpenAIEmbedderSpec
from consumer.kafka import admin_client, client_options
from consumer.settings import Settings
from consumer.stack.infinity import API_KEY, InfinityServer, openai_env

Say = Callable[[str], None]
GROUP = "cdc_bench_remote"  # also the vector table's name
CONCURRENCY = 4  # the backend's default requests in flight; the direct client keeps as many
# Requests of 64 inputs, as the local model's batches; a consumer batch fills all CONCURRENCY of them, as
# a deployment with a remote server would be set (CDC_BATCH_MAX_EVENTS), so the server is never idle
# while a batch is embedded, and only the pipeline's own time between batches sets the ratio.
INPUTS_PER_REQUEST = 64


def direct_rate(spec: OpenAIEmbedderSpec, texts: Sequence[str], batch: int) -> float:
    """Texts per second the server embeds when the backend's client sends it the pipeline's batches
    directly, one after the other (each cut into requests in flight together), with no pipeline around."""
    embedder = OpenAIEmbedder(spec)
    try:
        embedder.embed(list(texts[:batch]))  # warm-up
        started = time.perf_counter()
        embedded = sum(
            len(embedder.embed(list(texts[i : i + batch])).vectors) for i in range(0, len(texts), batch)
        )
        return embedded / (time.perf_counter() - started)
    finally:
        embedder.close()


async def _start_at_end(settings: Settings, group: str, topic: str) -> None:
    """Commit the group's offsets at the topic's end, so that its consumer reads only what comes next
    (the earlier phases left thousands of records on the source topic)."""
    async with admin_client(settings) as admin:
        (described,) = await admin.describe_topics([topic])
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(**client_options(settings), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.commit(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


def remote_path(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    settings: Settings,
    rows: list[dict[str, Any]],
    model_folder: Path,
    say: Say,
) -> dict[str, float]:
    """The pipeline's throughput with the openai backend and its ratio to the server's direct throughput."""
    logs = settings.stack_dir / "logs"
    server = InfinityServer(logs / "bench-infinity.log", model=model_folder)
    say(f"remote path: infinity-emb serving {model_folder.name} ...")
    server.start()
    consumer: ConsumerProcess | None = None
    try:
        remote_env = openai_env(env, server.base_url, API_KEY, GROUP, str(model_folder), GTE_SMALL.hidden)
        remote_env |= {
            "CDC_OPENAI_CONCURRENCY": str(CONCURRENCY),
            "CDC_OPENAI_MAX_INPUTS_PER_REQUEST": str(INPUTS_PER_REQUEST),
            "CDC_BATCH_MAX_EVENTS": str(CONCURRENCY * INPUTS_PER_REQUEST),
        }
        remote = Settings.from_env_map(remote_env)
        texts = bm.texts_of(rows, settings)
        batch = remote.batch_max_events

        def direct(when: str) -> float:
            say(f"  the server's own throughput {when} the pipeline's run: {len(texts)} texts in batches "
                f"of {batch}, requests of {INPUTS_PER_REQUEST}, {CONCURRENCY} in flight ...")  # fmt: skip
            rate = direct_rate(remote.openai_spec(), texts, batch)
            say(f"    {rate:.1f} texts/s")
            return rate

        asyncio.run(_start_at_end(remote, GROUP, remote.source_topic))
        consumer = (
            ConsumerProcess(remote_env, logs / "bench-consumer-remote.log")
            .start()
            .wait_ready()
            .wait_audited()
        )
        before = direct("before")
        say(f"  pipeline, openai backend: COPY {len(rows)} rows, waiting for the last vector ...")
        bulk = bulk_throughput(conn, remote, rows, say)
        after = direct("after")
    finally:
        if consumer is not None:
            consumer.stop()
        server.stop()
    bulk["direct_texts_per_s"] = (before + after) / 2
    bulk["ratio_to_direct"] = (
        bulk["texts_per_s"] / bulk["direct_texts_per_s"] if bulk["direct_texts_per_s"] > 0 else math.nan
    )
    say(
        f"  remote path {bulk['texts_per_s']:.1f} texts/s, {bulk['ratio_to_direct']:.2f} of the server's "
        "own throughput beside"
    )
    return bulk
