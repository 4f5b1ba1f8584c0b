"""Chunked embedding of the corpus's longest texts: the pipeline's tokens per second with
CDC_CHUNKING=chunk, as a ratio to the raw model embedding the same chunks in this process, the two
alternating within the phase (the host drifts too much for runs far apart)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from consumer.bench import model as bm
from consumer.bench.phases import bulk_throughput
from consumer.bench.remote import _start_at_end
from consumer.chunking import Chunker
from consumer.consumer_process import ConsumerProcess
from consumer.settings import Settings

Say = Callable[[str], None]
GROUP = "cdc_bench_chunked"  # also the vector table's name
ROUND_IDS = 1000  # a round's rows take ids this far past the previous round's


def longest_rows(corpus: Path, n: int, id_base: int) -> list[dict[str, Any]]:
    """Source-table rows of the corpus's `n` longest texts (read in place, never copied)."""
    with corpus.open() as f:
        items = sorted((json.loads(line) for line in f), key=lambda d: len(d["text"]), reverse=True)[:n]
    return [{"id": id_base + i, "title": d["package"], "body": d["text"]} for i, d in enumerate(items)]


def chunked_throughput(
    conn: psycopg.Connection[Any],
    env: dict[str, str],
    rows: list[dict[str, Any]],
    warm_up: list[dict[str, Any]],
    rounds: int,
    say: Say,
) -> dict[str, float]:
    """`warm_up`: long rows the consumer embeds first, unmeasured, as the raw model has embedded chunks
    before its measured run: a consumer that has run a while has met the window-long shapes.

    The raw model and the pipeline alternate for `rounds` (the pipeline's rows under new ids each
    round), and the best of each is kept, as for the raw model's variants: the stack's own background
    work (autovacuum after the earlier phases, a checkpoint) lands on one run or another, never on all.
    """
    chunked_env = {
        **env,
        "CDC_CHUNKING": "chunk",
        "CDC_VECTOR_TABLE": f"public.{GROUP}",
        "CDC_CONSUMER_GROUP": GROUP,
    }
    settings = Settings.from_env_map(chunked_env)
    embedder = bm.local_embedder(settings)
    tokenizer = embedder.tokenizer()
    chunker = Chunker(tokenizer, embedder.window, settings.chunk_overlap_tokens)
    texts = bm.texts_of(rows, settings)
    pieces = [piece for chunks in chunker.split_all(texts) for piece in chunks]
    tokens = sum(len(tokenizer.encode(piece).ids) for piece in pieces)
    splits: list[float] = []

    def raw() -> float:
        # the split is the pipeline's work too (its model call starts with it), and counts against it
        started = time.perf_counter()
        chunker.split_all(texts)
        splits.append(time.perf_counter() - started)
        say(
            f"  raw model: the same {len(pieces)} chunks ({tokens:,} tokens; split in {splits[-1]:.2f} s) ..."
        )
        started = time.perf_counter()
        embedder.embed(pieces)
        rate = tokens / (time.perf_counter() - started)
        say(f"    {rate:,.0f} tokens/s")
        return rate

    say(
        f"chunked: the {len(rows)} longest corpus texts, {len(pieces)} chunks of at most "
        f"{embedder.window} tokens, {rounds} rounds"
    )
    embedder.embed(pieces[:4])  # warm-up
    raws = [raw()]
    pipeline: list[float] = []
    asyncio.run(_start_at_end(settings, GROUP, settings.source_topic))
    consumer = ConsumerProcess(chunked_env, settings.stack_dir / "logs" / "bench-consumer-chunked.log")
    consumer.start().wait_ready().wait_audited()
    try:
        say(f"  pipeline warm-up: {len(warm_up)} long rows ...")
        bulk_throughput(conn, settings, warm_up, say)
        for round_ in range(rounds):
            anew = [{**row, "id": row["id"] + (round_ + 1) * ROUND_IDS} for row in rows]
            say(f"  pipeline, CDC_CHUNKING=chunk, round {round_ + 1}/{rounds}: COPY {len(rows)} rows ...")
            pipeline.append(tokens / bulk_throughput(conn, settings, anew, say)["seconds"])
            say(f"    {pipeline[-1]:,.0f} tokens/s")
            raws.append(raw())
    finally:
        consumer.stop()
    result = {
        "documents": float(len(rows)),
        "chunks": float(len(pieces)),
        "tokens": float(tokens),
        "rounds": float(rounds),
        "tokens_per_s": max(pipeline),
        "raw_tokens_per_s": max(raws),
        "pipeline_worst_tokens_per_s": min(pipeline),
        "raw_worst_tokens_per_s": min(raws),
    }
    result["ratio_to_raw"] = result["tokens_per_s"] / result["raw_tokens_per_s"]
    model_s = tokens / result["raw_tokens_per_s"]
    result["split_s"] = min(splits)
    result["split_to_model"] = result["split_s"] / model_s
    result["ceiling_to_raw"] = model_s / (model_s + result["split_s"])
    say(
        f"  chunked {result['tokens_per_s']:,.0f} tokens/s, {result['ratio_to_raw']:.2f} of the raw "
        f"model (best of each); splitting the texts takes {result['split_to_model']:.0%} of the model's "
        f"time, a ceiling of {result['ceiling_to_raw']:.2f}"
    )
    return result
