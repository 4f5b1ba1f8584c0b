"""consumer.app.EmbeddingConsumer, the whole loop, over fakes of aiokafka's consumer and transactional
producer and of the BatchProcessor: holding a batch through outages and operator errors, isolating a
poison record, fencing a batch whose partitions moved, and rebuilding a fatally failed producer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    InvalidTxnState,
    KafkaConnectionError,
    KafkaError,
    ProducerFenced,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from consumer.app import EmbeddingConsumer
from consumer.commit import MAX_REJECTED_IN_A_ROW
from consumer.health import HealthState
from consumer.kafka import KafkaPublisher
from consumer.producer import TransactionalProducer
from consumer.retry import H_ERROR_CLASS, H_ERROR_MESSAGE, H_ORIGINAL_OFFSET, H_PAYLOAD_DROPPED
from consumer.settings import Settings
from tests.unit.fakes import DLQ_TOPIC, RETRY_TOPIC, SOURCE_TOPIC, FakeSink
from tests.unit.kafka_fakes import KILL_ME, RETRY_ME, FakeBroker, FakeConsumer, FakeProcessor, FakeProducer

TP0, TP1 = TopicPartition(SOURCE_TOPIC, 0), TopicPartition(SOURCE_TOPIC, 1)
READ_ONLY = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
DROPPED = "partitions moved during the batch; dropped it uncommitted, their new owner applies it"
FOREVER = 1_000_000  # faults enough to last until the test fixes their cause


@dataclass
class Loop:
    settings: Settings
    broker: FakeBroker
    kafka: FakeConsumer
    producer: TransactionalProducer
    producers: list[FakeProducer]
    processor: FakeProcessor
    health: HealthState
    consumer: EmbeddingConsumer
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    logs: list[dict[str, Any]] = field(default_factory=list)
    prepare: list[Callable[[FakeProducer], None]] = field(default_factory=list)  # run on new producers

    def add(self, *values: bytes, partition: int = 0) -> None:
        for value in values:
            self.broker.append(SOURCE_TOPIC, partition, b'{"id": 1}', value)

    def committed(self, tp: TopicPartition = TP0) -> int:
        return self.broker.committed.get(tp, 0)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs if entry["event"] == name]

    @property
    def fake(self) -> FakeProducer:
        return self.producers[-1]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until `condition` holds (a bound on steps, not a timing assertion)."""
    for _ in range(5_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def loop() -> AsyncIterator[Loop]:
    async with running_loop() as state:
        yield state


@contextlib.asynccontextmanager
async def running_loop(
    batch_max_wait_ms: int = 0, batch_max_bytes: int = 1 << 20, embed_ahead: bool = True
) -> AsyncIterator[Loop]:
    """The loop over the fakes, subscribed and assigned TP0 and TP1; `batch_max_wait_ms`: its linger."""
    settings = Settings(
        batch_max_wait_ms=batch_max_wait_ms,
        batch_max_bytes=batch_max_bytes,
        embed_ahead=embed_ahead,
        db_retry_backoff_max_s=0.001,
        shutdown_grace_s=0.01,
        retry_max_attempts=3,
    )
    broker = FakeBroker()
    kafka = FakeConsumer(broker)
    producers: list[FakeProducer] = []
    prepare: list[Callable[[FakeProducer], None]] = []

    def factory() -> FakeProducer:
        producers.append(FakeProducer(broker))
        for step in prepare:
            step(producers[-1])
        return producers[-1]

    producer = TransactionalProducer(settings, factory)
    await producer.start()
    processor = FakeProcessor(settings, KafkaPublisher(producer))
    health = HealthState(stall_after_s=30.0)
    health.started = health.database_ok = True
    consumer = EmbeddingConsumer(settings, kafka, producer, processor, FakeSink(), health)
    state = Loop(settings, broker, kafka, producer, producers, processor, health, consumer)
    state.prepare = prepare
    with capture_logs() as logs:
        state.logs = logs
        task = asyncio.create_task(consumer.run(state.stop))
        await until(lambda: kafka.listener is not None, "the loop subscribes")
        await kafka.rebalance({TP0, TP1})
        try:
            yield state
        finally:
            state.stop.set()
            # a batch held for good never sees the stop: cancel it, as the service does after its grace
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                pytest.fail("the loop did not stop: a batch is still held")
            task.result()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- holding a batch through an outage --------------------------------------------------------------


async def test_a_retriable_kafka_error_holds_the_batch_paused_and_then_commits_it(loop: Loop) -> None:
    loop.fake.faults["offsets"] = [RequestTimedOutError(), KafkaConnectionError("broker gone")]
    loop.add(b"a", b"b")
    await until(lambda: loop.committed() == 2, "the held batch commits")
    assert loop.processor.calls == [[(0, 0), (0, 1)]] * 3  # held and re-applied, nothing skipped
    assert loop.fake.aborts == 2 and loop.fake.commits == 1
    assert [e["log_level"] for e in loop.events("dependency unavailable; holding until it is back")] == [
        "warning",
        "warning",  # the cause changed once: one line per cause, not per retry
    ]
    assert loop.events("recovered")
    assert loop.kafka.paused() == set()
    assert loop.health.ready() == (True, "ok")


async def test_partitions_stay_paused_while_the_batch_is_held(loop: Loop) -> None:
    paused_while_held: list[set[TopicPartition]] = []

    async def down() -> None:
        paused_while_held.append(loop.kafka.paused())

    loop.processor.during = down
    loop.processor.faults = [psycopg.OperationalError("connection refused")] * 3
    loop.add(b"a")
    await until(lambda: loop.committed() == 1, "the batch commits once Postgres is back")
    assert paused_while_held[1:] == [{TP0, TP1}] * 3  # every retry ran with every partition paused
    assert loop.kafka.paused() == set()


async def test_an_unauthorized_topic_is_an_operator_error_reported_once_until_fixed(loop: Loop) -> None:
    loop.fake.faults["offsets"] = [TopicAuthorizationFailedError(RETRY_TOPIC)] * FOREVER
    loop.add(b"a")
    await until(lambda: len(loop.processor.calls) >= 3, "retries")
    ready, reason = loop.health.ready()
    assert not ready and reason.startswith("operator error: Kafka refuses the consumer")
    assert f"Write on {RETRY_TOPIC} and {DLQ_TOPIC}" in reason  # names what to grant
    assert loop.kafka.paused() == {TP0, TP1}
    loop.fake.faults["offsets"].clear()
    await until(lambda: loop.committed() == 1, "recovery once the ACL is granted")
    [error] = loop.events("operator error; holding until it is fixed")
    assert error["log_level"] == "error" and "Kafka ACLs" in error["fix"]
    assert loop.health.ready() == (True, "ok")
    assert loop.kafka.paused() == set()


async def test_a_fetch_the_broker_refuses_makes_the_consumer_not_ready_until_it_works(loop: Loop) -> None:
    loop.kafka.fetch_errors = [GroupAuthorizationFailedError("cdc-embedder")] * FOREVER
    await until(lambda: loop.health.ready()[0] is False, "readiness fails")
    assert "CDC_CONSUMER_GROUP" in loop.health.ready()[1]
    loop.kafka.fetch_errors.clear()
    loop.add(b"a")
    await until(lambda: loop.committed() == 1, "fetching again")
    assert len(loop.events("operator error; holding until it is fixed")) == 1
    assert loop.health.ready() == (True, "ok")


# --- operator errors of the database --------------------------------------------------------------


async def test_a_read_only_database_is_an_operator_error_not_dead_letters(loop: Loop) -> None:
    loop.processor.faults = [READ_ONLY] * FOREVER
    loop.add(b"a", b"b", b"c")
    await until(lambda: len(loop.processor.calls) >= 3, "retries")
    ready, reason = loop.health.ready()
    assert not ready
    assert reason.startswith("operator error: the database is read-only")
    assert "point CDC_DATABASE_URL at the primary" in reason
    assert loop.kafka.paused() == {TP0, TP1}
    loop.processor.faults.clear()
    await until(lambda: loop.committed() == 3, "the failover is fixed")
    assert loop.broker.published == []  # nothing dead-lettered
    assert loop.processor.applied == [(0, 0), (0, 1), (0, 2)]
    assert len(loop.events("operator error; holding until it is fixed")) == 1  # not once per retry
    assert loop.health.ready() == (True, "ok")


async def test_an_unexpected_error_holds_the_batch_with_its_traceback(loop: Loop) -> None:
    loop.processor.faults = [TypeError("a bug")] * 2
    loop.add(b"a")
    await until(lambda: loop.committed() == 1, "the batch commits")
    [error] = loop.events("operator error; holding until it is fixed")
    assert isinstance(error["exc_info"], TypeError)
    assert loop.broker.published == []


# --- isolating a poison record --------------------------------------------------------------------


async def test_a_record_the_database_rejects_is_isolated_and_dead_lettered_alone(loop: Loop) -> None:
    loop.processor.rejects[(0, 1)] = psycopg.errors.NotNullViolation('null value in column "embedding"')
    loop.add(b"a", b"b", b"c")
    await until(lambda: loop.committed() == 3, "the batch commits")
    assert loop.processor.calls == [[(0, 0), (0, 1), (0, 2)], [(0, 0)], [(0, 1)], [(0, 2)]]
    assert loop.processor.applied == [(0, 0), (0, 2)]
    [dead] = loop.broker.published
    assert dead.topic == DLQ_TOPIC and dead.value == b"b"
    assert dead.header[H_ERROR_CLASS] == b"database_rejected"
    assert dead.header[H_ERROR_MESSAGE].startswith(b"NotNullViolation (23502): null value")
    assert loop.fake.commits == 1  # the isolated records share the batch's transaction


async def test_a_table_that_rejects_every_record_is_held_not_dead_lettered(loop: Loop) -> None:
    rows = MAX_REJECTED_IN_A_ROW + 1
    for offset in range(rows):
        loop.processor.rejects[(0, offset)] = psycopg.errors.NotNullViolation('null value in column "x"')
    loop.add(*[b"v"] * rows)
    await until(lambda: loop.health.ready()[0] is False, "readiness fails")
    assert "operator error: the database rejects every record" in loop.health.ready()[1]
    loop.processor.rejects.clear()  # the column got its default
    await until(lambda: loop.committed() == rows, "the batch commits")
    assert loop.broker.published == []
    assert len(loop.processor.applied) == rows


async def test_isolation_does_not_recurse_when_publishing_the_dead_letter_fails(loop: Loop) -> None:
    loop.processor.rejects[(0, 0)] = psycopg.errors.NumericValueOutOfRange("integer out of range")
    loop.fake.faults["send"] = [KafkaConnectionError("broker gone")]
    loop.add(b"a", b"b")
    await until(lambda: loop.committed() == 2, "the batch commits")
    assert len(loop.broker.to(DLQ_TOPIC)) == 1
    # the batch, then isolation twice (the dead letter's broker error is an outage, not a new poison)
    assert loop.processor.calls == [[(0, 0), (0, 1)], [(0, 0)], [(0, 1)], [(0, 0)], [(0, 1)]]


# --- revoked mid-batch ----------------------------------------------------------------------------


async def test_a_batch_held_past_a_revocation_never_commits(loop: Loop) -> None:
    loop.processor.faults = [psycopg.OperationalError("connection refused")] * FOREVER
    loop.add(b"a", b"b")
    await until(lambda: len(loop.processor.calls) >= 2, "the batch is held")
    await loop.kafka.rebalance({TP1})  # the grace period runs out: TP0 goes to another member
    await until(lambda: bool(loop.events(DROPPED)), "the drop")
    loop.processor.faults.clear()
    assert loop.committed() == 0 and loop.broker.published == []
    assert loop.events("revocation did not wait for the in-flight batch; it will not commit")
    assert loop.kafka.paused() == set()  # the hold ended with the batch


async def test_a_batch_revoked_inside_its_transaction_aborts_it(loop: Loop) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow() -> None:
        entered.set()
        await release.wait()

    loop.processor.during = slow
    loop.add(b"a", KILL_ME)
    await entered.wait()
    await loop.kafka.rebalance({TP0, TP1})  # TP0 is ours again, but in a new generation
    loop.processor.during = None
    release.set()
    # the new generation re-fetches from the committed offset and commits the batch once
    await until(lambda: loop.committed() == 2, "the new generation commits")
    assert loop.fake.aborts == 1 and loop.fake.commits == 1
    assert len(loop.broker.to(DLQ_TOPIC)) == 1  # the dead letter of the aborted attempt never landed
    assert len(loop.events("dead-lettered")) == 1


async def test_an_expelled_member_drops_its_batch_and_rewinds(loop: Loop) -> None:
    loop.processor.faults = [KafkaConnectionError("broker gone")] * FOREVER
    loop.add(b"a", b"b")
    await until(lambda: len(loop.processor.calls) >= 2, "the batch is held")
    loop.kafka.expel()  # its session expired during the outage; the listener has not run yet
    await until(lambda: (TP0, 0) in loop.kafka.seeks, "the rewind")
    loop.processor.faults.clear()
    assert loop.committed() == 0
    assert loop.kafka.paused() == {TP0}  # no fetching of batches that would be dropped too
    await loop.kafka.rebalance({TP0, TP1})  # the member joins again
    await until(lambda: loop.committed() == 2, "the batch commits in the new generation")
    assert len(loop.events(DROPPED)) == 1


async def test_a_partition_assigned_again_while_a_batch_gathers_is_rewound_to_what_it_refetched() -> None:
    """A rebalance that gives a partition back to this member while a batch lingers: the records fetched
    after it (from the committed offset) join the batch under the old claim, which no longer holds. The
    batch is dropped, and the partition must be rewound, or the next batch would commit past records
    that were never applied."""
    async with running_loop(batch_max_wait_ms=1_000) as loop:
        loop.add(b"a", b"b")
        await until(lambda: loop.kafka.positions[TP0] == 2, "the first fetch of the batch")
        await loop.kafka.rebalance({TP0, TP1})  # ours again, from the committed offset 0
        loop.add(b"c")
        await until(lambda: bool(loop.events(DROPPED)), "the batch is dropped")
        assert loop.committed() == 0
        loop.add(b"d")
        await until(lambda: loop.committed() == 4, "the next batch commits")
        assert {offset for partition, offset in loop.processor.applied if partition == 0} == {0, 1, 2, 3}


async def test_records_past_a_batchs_byte_budget_are_fetched_again_by_the_next_batches() -> None:
    """The records a fetch returned past the budget were taken from aiokafka: unless each partition is
    rewound to them, the next batch would commit past records that were never applied."""
    async with running_loop(batch_max_bytes=30) as loop:  # records of 13 bytes (key 9, value 4): 2 a batch
        loop.add(b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee")
        loop.add(b"ffff", b"gggg", partition=1)
        await until(lambda: loop.committed(TP0) == 5 and loop.committed(TP1) == 2, "every record commits")
        assert max(len(call) for call in loop.processor.calls) == 2
        assert sorted(loop.processor.applied) == [(0, o) for o in range(5)] + [(1, 0), (1, 1)]  # once each


# --- the next batch embedded ahead (CDC_EMBED_AHEAD) ---------------------------------------------


def blocking(loop: Loop) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next batch wait, past its model calls, until `release` is set; `entered` once it does."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def wait() -> None:
        entered.set()
        loop.processor.during = None
        await release.wait()

    loop.processor.during = wait
    return entered, release


async def test_the_next_batch_is_embedded_ahead_while_one_commits_and_applied_after_it(loop: Loop) -> None:
    entered, release = blocking(loop)
    loop.add(b"a")
    await entered.wait()
    loop.add(b"b", b"c")
    loop.add(b"d", partition=1)
    await until(lambda: len(loop.processor.ahead) == 1, "the next batch embedded ahead")
    assert sorted(loop.processor.ahead[0]) == [(0, 1), (0, 2), (1, 0)]
    assert loop.processor.calls == [[(0, 0)]] and loop.committed() == 0  # the first is still in flight
    release.set()
    await until(lambda: loop.committed() == 3 and loop.committed(TP1) == 1, "both commit")
    assert [sorted(call) for call in loop.processor.calls] == [[(0, 0)], [(0, 1), (0, 2), (1, 0)]]


async def test_without_embedding_ahead_the_next_batch_is_fetched_after_one_commits() -> None:
    async with running_loop(embed_ahead=False) as loop:
        entered, release = blocking(loop)
        loop.add(b"a")
        await entered.wait()
        loop.add(b"b")
        for _ in range(50):
            await asyncio.sleep(0.001)
        assert loop.kafka.positions[TP0] == 1 and loop.processor.ahead == []
        release.set()
        await until(lambda: loop.committed() == 2, "both commit")
        assert loop.processor.calls == [[(0, 0)], [(0, 1)]] and loop.processor.ahead == []


async def test_a_batch_fetched_behind_one_that_is_dropped_is_rewound_and_applied_after_it(loop: Loop) -> None:
    """The next batch was fetched while the one before was in flight, which is then dropped (its
    partitions moved and came back) and rewound. The next one must go back too, on every partition, to
    the earliest record of either: applied alone, it would be dropped as well and rewind past the
    records of the first."""
    entered, release = blocking(loop)
    loop.add(b"a")
    await entered.wait()
    loop.add(b"b")
    loop.add(b"c", partition=1)
    await until(lambda: len(loop.processor.ahead) == 1, "the next batch embedded ahead")
    await loop.kafka.rebalance({TP0, TP1})  # ours again, but in a new generation
    release.set()
    await until(lambda: loop.committed() == 2 and loop.committed(TP1) == 1, "all commit")
    assert len(loop.events(DROPPED)) == 1
    assert [sorted(call) for call in loop.processor.calls] == [[(0, 0)], [(0, 0), (0, 1), (1, 0)]]


async def test_a_batch_fetched_behind_one_that_is_dropped_goes_back_on_partitions_that_one_had_not(
    loop: Loop,
) -> None:
    entered, release = blocking(loop)
    loop.add(b"a")
    await entered.wait()
    loop.add(b"b", partition=1)
    await until(lambda: len(loop.processor.ahead) == 1, "the next batch embedded ahead")
    loop.kafka.expel()
    release.set()
    await until(lambda: bool(loop.events(DROPPED)), "the batch in flight is dropped")
    await until(lambda: (TP1, 0) in loop.kafka.seeks, "the next batch is rewound too")
    assert loop.committed() == 0 and loop.committed(TP1) == 0
    await loop.kafka.rebalance({TP0, TP1})  # the member joins again
    await until(lambda: loop.committed() == 1 and loop.committed(TP1) == 1, "both commit")


# --- a fatal producer -----------------------------------------------------------------------------


def sender_died_of(cause: KafkaError) -> KafkaError:
    """How aiokafka's dying sender task reports most errors: wrapped in a plain KafkaError."""
    wrapper = KafkaError("Unexpected error during batch delivery")
    wrapper.__cause__ = cause
    return wrapper


@pytest.mark.parametrize("fatal", [ProducerFenced(), sender_died_of(InvalidTxnState())])
async def test_a_fatally_failed_producer_is_rebuilt_and_the_batch_committed_once(
    loop: Loop, fatal: KafkaError
) -> None:
    renewals = counter("cdc_embedder_producer_renewals_total")
    first = loop.fake
    first.faults["offsets"] = [fatal]
    loop.add(b"a", KILL_ME)
    await until(lambda: loop.committed() == 2, "the batch commits on a new producer")
    assert len(loop.producers) == 2 and first.stopped and loop.fake.started
    assert first.commits == 0 and loop.fake.commits == 1
    assert len(loop.broker.to(DLQ_TOPIC)) == 1
    assert len(loop.events("dead-lettered")) == 1  # only the committed one
    assert counter("cdc_embedder_producer_renewals_total") == renewals + 1
    assert loop.health.ready() == (True, "ok")


async def test_an_unauthorized_transactional_id_recovers_without_a_restart(loop: Loop) -> None:
    denied = TransactionalIdAuthorizationFailed("cdc-embedder-host-1")
    loop.fake.faults["offsets"] = [denied]
    loop.prepare.append(lambda new: new.faults.update(start=[denied]))  # every new one fails to start
    loop.add(b"a")
    await until(lambda: len(loop.producers) >= 3, "producers rebuilt")
    ready, reason = loop.health.ready()
    assert not ready and "Write and Describe on transactional ids prefixed cdc-embedder-" in reason
    loop.prepare.clear()
    await until(lambda: loop.committed() == 1, "the ACL is granted")
    assert len(loop.events("operator error; holding until it is fixed")) == 1
    assert loop.health.ready() == (True, "ok")


async def test_a_producer_fenced_again_after_its_rebuild_is_an_operator_error(loop: Loop) -> None:
    loop.fake.faults["offsets"] = [ProducerFenced()]
    loop.prepare.append(lambda new: new.faults.update(offsets=[ProducerFenced()]))  # a twin fences each
    loop.add(b"a")
    await until(lambda: len(loop.producers) >= 4, "producers rebuilt")
    ready, reason = loop.health.ready()
    assert not ready and "again after the producer was rebuilt" in reason
    assert "own hostname" in reason
    loop.prepare.clear()
    await until(lambda: loop.committed() == 1, "the twin is gone")
    assert len(loop.events("rebuilding the transactional producer; retrying the batch")) == 1
    assert len(loop.events("operator error; holding until it is fixed")) == 1
    assert loop.health.ready() == (True, "ok")


# --- nothing too large to dead-letter ------------------------------------------------------------


async def test_a_copy_over_the_producers_limit_becomes_a_reference_dead_letter(loop: Loop) -> None:
    loop.fake.max_request_size = 500
    references = counter("cdc_embedder_dead_letter_references_total")
    big = RETRY_ME + b" " + b"x" * 1000
    loop.add(b"a", big)
    await until(lambda: loop.committed() == 2, "the batch commits")
    [reference] = loop.broker.published
    assert (reference.topic, reference.key, reference.value) == (DLQ_TOPIC, b'{"id": 1}', None)
    assert reference.header[H_ORIGINAL_OFFSET] == b"1" and H_PAYLOAD_DROPPED in reference.header
    assert counter("cdc_embedder_dead_letter_references_total") == references + 1
    [line] = loop.events("dead-lettered")
    assert line["payload_dropped"] is True and line["offset"] == 1


async def test_a_copy_the_broker_refuses_as_too_large_becomes_a_reference_dead_letter(loop: Loop) -> None:
    loop.broker.max_message_bytes[RETRY_TOPIC] = 500
    big = RETRY_ME + b" " + b"x" * 1000
    loop.add(big)
    await until(lambda: loop.committed() == 1, "the batch commits")
    [reference] = loop.broker.published
    assert reference.topic == DLQ_TOPIC and reference.value is None
    assert reference.header[H_PAYLOAD_DROPPED].endswith(f"refused by {RETRY_TOPIC}".encode())
    # the refusal spent a sequence number: a new producer sent the reference
    assert len(loop.producers) == 2 and loop.producers[0].aborts == 1


# --- one log line per routed record -------------------------------------------------------------


async def test_each_retry_and_dead_letter_is_logged_once_with_key_class_and_reason(loop: Loop) -> None:
    loop.fake.faults["commit"] = [KafkaConnectionError("broker gone")]  # the first attempt aborts
    loop.add(RETRY_ME, KILL_ME, b"fine")
    await until(lambda: loop.committed() == 3, "the batch commits")
    [retry] = loop.events("retry scheduled")
    [dead] = loop.events("dead-lettered")
    assert retry["log_level"] == "info" and dead["log_level"] == "warning"
    assert (retry["key"], retry["error_class"], retry["offset"]) == ('{"id": 1}', "model_error", 0)
    assert (dead["error_class"], dead["reason"]) == ("invalid_json", "the fake says b'kill me'")
    assert retry["to"] == RETRY_TOPIC and dead["to"] == DLQ_TOPIC
