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

from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.app import EmbeddingConsumer
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
from consumer.pipeline import BatchProcessor
from consumer.producer import TransactionalProducer
from consumer.schema import ensure_vector_table
from consumer.settings import Settings
from consumer.sink import PgVectorSink, open_pool
from consumer.targets import ensure_target_state

log = get_logger("cdc_embedder.service")


async def run_service(
    settings: Settings, embedder_factory: Callable[[Settings], Embedder] = build_embedder
) -> int:
    """Run until SIGTERM; `embedder_factory` is the seam fault-injection tests wrap."""
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
        embedder=settings.embedder,
        model=settings.openai_model if settings.embedder == "openai" else settings.model,
        database=settings.redacted_dsn(),
        kafka=settings.bootstrap_servers,
        topic=settings.source_topic,
        group=settings.consumer_group,
        http_port=server.server_address[1],
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    try:
        embedder = await loop.run_in_executor(executor, embedder_factory, settings)
        metrics.record_model_info(embedder.name, embedder.dimension, embedder.dtype)
        pool = open_pool(settings)
        await pool.open(wait=True, timeout=30)
        try:
            async with pool.connection() as conn:
                info = await ensure_vector_table(conn, settings, embedder.dimension)
                await ensure_target_state(conn, settings, embedder.name, embedder.dimension)
            # Started: the startup probe must not restart a pod that waits for Debezium's topic.
            health.started = health.database_ok = True
            if await _prepare_topics(settings, stop):
                sink = PgVectorSink(pool, settings, info, embedder.name)
                await _consume(settings, embedder, sink, health, executor, stop, info.key_columns)
        finally:
            await pool.close()
    finally:
        beat.cancel()
        server.shutdown()
        executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")
    return 0


async def _prepare_topics(settings: Settings, stop: asyncio.Event) -> bool:
    """Wait for the source topic, then create the retry and dead-letter topics like it; False: stopped.

    Subscribing first could create the source topic with the broker's defaults (see wait_for_topic), and
    the retry and dead-letter topics copy its partition count and record size.
    """
    async with admin_client(settings) as admin:
        if not await wait_for_topic(admin, settings.source_topic, stop):
            return False
        await ensure_topics(admin, settings)
    return True


async def _consume(
    settings: Settings,
    embedder: Embedder,
    sink: PgVectorSink,
    health: HealthState,
    executor: ThreadPoolExecutor,
    stop: asyncio.Event,
    key_columns: tuple[str, ...],
) -> None:
    producer = TransactionalProducer(settings)
    kafka = make_consumer(settings)
    try:
        await producer.start()
        await kafka.start()
    except (KafkaError, OSError) as exc:
        raise unreachable(settings, exc) from exc
    try:
        processor = BatchProcessor(
            settings, embedder, sink, KafkaPublisher(producer), executor, key_columns, health.model_stall
        )
        consumer = EmbeddingConsumer(settings, kafka, producer, processor, sink, health)
        log.info("started", dimension=embedder.dimension, vector_table=settings.vector_table)
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
