"""Wiring and lifecycle of `cdc-embedder run`: start in order, run, stop cleanly on SIGTERM.

Start-up fails fast with a message naming the setting to change (bad model, tables that do not fit the
model, unreachable Kafka); Kubernetes' startup probe covers the model loading. Then it waits, as long as
it takes, for Debezium to create the source topic, creates the retry and dead-letter topics like it, and
subscribes. On SIGTERM the in-flight batch is finished and committed, the consumer leaves its group, and
the process exits 0 within CDC_SHUTDOWN_GRACE_S, abandoning (not committing) a batch that would take
longer.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.app import EmbeddingConsumer
from consumer.chunking import with_chunking
from consumer.chunks import ensure_chunk_table
from consumer.embedders import build_embedder
from consumer.embedders.base import Embedder
from consumer.health import HealthState, heartbeat, serve
from consumer.kafka import (
    KafkaPublisher,
    admin_client,
    ensure_topics,
    make_consumer,
    unreachable,
    wait_for_topic,
)
from consumer.logs import get_logger
from consumer.ops.audit import audit_periodically
from consumer.ops.migrate import export_served_by
from consumer.pipeline import BatchProcessor
from consumer.producer import TransactionalProducer
from consumer.router import Route, Router
from consumer.schema import ensure_vector_table
from consumer.settings import Settings
from consumer.sink import PgVectorSink, open_pool
from consumer.spec import load_pipelines
from consumer.targets import ensure_target_state

log = get_logger("cdc_embedder.service")


async def run_service(
    settings: Settings, embedder_factory: Callable[[Settings], Embedder] = build_embedder
) -> int:
    """Run until SIGTERM; `embedder_factory` is the seam fault-injection tests wrap."""
    specs = load_pipelines(settings)
    health = HealthState(stall_after_s=settings.liveness_stall_s)
    server = serve(health, settings.http_host, settings.http_port)
    beat = asyncio.create_task(heartbeat(health), name="heartbeat")
    metrics.record_build_info()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "starting",
        pipelines=[spec.name for spec in specs],
        database=settings.redacted_dsn(),
        vector_database=settings.redacted_dsn(settings.vector_dsn)
        if settings.separate_vector_database
        else None,
        kafka=settings.bootstrap_servers,
        group=settings.consumer_group,
        http_port=server.server_address[1],
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    try:
        views = [spec.settings(settings) for spec in specs]
        embedders = await _load_embedders(views, embedder_factory, executor)
        # what reads the vector table by settings (the audit) needs the identity the embedder learnt
        views = [
            Settings.model_validate({**v.model_dump(), "model": embedders[v.pipeline].name})
            if v.model_identity != embedders[v.pipeline].name
            else v
            for v in views
        ]
        pool = open_pool(settings)  # the vector database
        # the source database, where the vectors live elsewhere: TOAST lookups and start-up checks only
        source_pool = open_pool(settings, dsn=settings.dsn) if settings.separate_vector_database else pool
        await pool.open(wait=True, timeout=30)
        if source_pool is not pool:
            await source_pool.open(wait=True, timeout=30)
        watcher: asyncio.Task[None] | None = None
        try:
            pipelines = []
            for view in views:
                embedder = embedders[view.pipeline]
                async with pool.connection() as conn, source_pool.connection() as source:
                    info = await ensure_vector_table(conn, view, embedder.dimension, source)
                    await ensure_chunk_table(conn, view, info, embedder.dimension)
                    await ensure_target_state(conn, view, embedder.name, embedder.dimension)
                sink = PgVectorSink(pool, view, info, embedder.name, source_pool)
                pipelines.append(_Pipeline(view, embedder, sink, info.key_columns))
            watcher = asyncio.create_task(export_served_by(pool, specs), name="search views")
            # Started: the startup probe must not restart a pod that waits for Debezium's topic.
            health.started = health.database_ok = True
            audits = asyncio.create_task(audit_periodically(views, stop), name="audit")
            try:
                if await _prepare_topics(
                    settings, list(dict.fromkeys(p.settings.source_topic for p in pipelines)), stop
                ):
                    await _consume(settings, pipelines, health, executor, stop)
            finally:
                audits.cancel()
                await asyncio.gather(audits, return_exceptions=True)
        finally:
            if watcher is not None:
                watcher.cancel()
            await pool.close()
            if source_pool is not pool:
                await source_pool.close()
    finally:
        beat.cancel()
        server.shutdown()
        executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
    return 0


@dataclass(frozen=True, slots=True)
class _Pipeline:
    settings: Settings  # the process settings with this pipeline's fields
    embedder: Embedder
    sink: PgVectorSink
    key_columns: tuple[str, ...]


async def _load_embedders(
    views: list[Settings], factory: Callable[[Settings], Embedder], executor: ThreadPoolExecutor
) -> dict[str, Embedder]:
    """Each pipeline's embedder, by pipeline name; pipelines of one model share it (one copy in memory)."""
    loop = asyncio.get_running_loop()
    embedders: dict[str, Embedder] = {}
    loaded: dict[tuple[object, ...], Embedder] = {}
    for view in views:
        how: tuple[object, ...] = (
            view.embedder,
            view.model,
            view.max_seq_length,
            view.embed_dtype,
            view.embed_token_budget,
            view.embed_runtime,
            view.embed_quantization,
        )
        if view.embedder == "openai":
            how += (view.openai_spec(),)
        if how not in loaded:
            loaded[how] = await loop.run_in_executor(executor, factory, view)
        # chunking wraps the shared model per pipeline: one may chunk what another truncates
        embedder = embedders[view.pipeline] = with_chunking(loaded[how], view)
        metrics.record_model_info(view.pipeline, embedder.name, embedder.dimension, embedder.dtype)
        if view.embed_ahead:  # its series from the start: no guess wasted yet reads 0, not "no data"
            metrics.TEXTS_AHEAD_UNUSED.labels(pipeline=view.pipeline)
    return embedders


async def _prepare_topics(settings: Settings, sources: list[str], stop: asyncio.Event) -> bool:
    """Wait for the source topics, then create the retry and dead-letter topics like them; False: stopped.

    Subscribing first could create a source topic with the broker's defaults (see wait_for_topic), and
    the retry and dead-letter topics copy the source topics' partition count and record size.
    """
    async with admin_client(settings) as admin:
        for topic in sources:
            if not await wait_for_topic(admin, topic, stop):
                return False
        await ensure_topics(admin, settings, sources)
    return True


async def _consume(
    settings: Settings,
    pipelines: list[_Pipeline],
    health: HealthState,
    executor: ThreadPoolExecutor,
    stop: asyncio.Event,
) -> None:
    producer = TransactionalProducer(settings)
    kafka = make_consumer(settings)
    try:
        await producer.start()
        await kafka.start()
    except (KafkaError, OSError) as exc:
        raise unreachable(settings, exc) from exc
    try:
        publisher = KafkaPublisher(producer)
        router = Router(
            [
                Route(
                    p.settings.source_topic,
                    p.settings.pipeline,
                    BatchProcessor(
                        p.settings, p.embedder, p.sink, publisher, executor, p.key_columns, health.model_stall
                    ),
                )
                for p in pipelines
            ]
        )
        # the sink serves the loop's database health check: all pipelines share its pool
        consumer = EmbeddingConsumer(
            settings, kafka, producer, router, pipelines[0].sink, health, router.source_topics
        )
        for p in pipelines:
            log.info(
                "started",
                pipeline=p.settings.pipeline,
                topic=p.settings.source_topic,
                model=p.embedder.name,
                dimension=p.embedder.dimension,
                vector_table=p.settings.vector_table,
            )
        await _run_until_stopped(consumer, stop, settings.shutdown_grace_s)
    finally:
        await kafka.stop()  # leaves the group, so partitions move at once
        await producer.stop()


async def _run_until_stopped(consumer: EmbeddingConsumer, stop: asyncio.Event, grace_s: float) -> None:
    task = asyncio.create_task(consumer.run(stop), name="consumer")
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopped.cancel()
        task.result()  # re-raise what ended the loop
        return
    log.info("stop requested; finishing the in-flight batch", grace_s=grace_s)
    try:
        await asyncio.wait_for(asyncio.shield(task), grace_s)
    except TimeoutError:
        log.warning("grace period over; abandoning the in-flight batch uncommitted")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
