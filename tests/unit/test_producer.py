"""consumer.producer.TransactionalProducer over a fake aiokafka producer, and the producer's sizing."""

from __future__ import annotations

import pytest

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.kafka import MAX_REQUEST_BYTES, KafkaPublisher, make_producer
from consumer.producer import Fenced, TransactionalProducer
from consumer.retry import H_PAYLOAD_DROPPED, RetryPolicy, RetryState
from consumer.settings import Settings
from tests.unit.fakes import DLQ_TOPIC, RETRY_TOPIC, Topic
from tests.unit.kafka_fakes import FakeBroker, FakeProducer

SETTINGS = Settings()


async def test_the_producer_never_refuses_a_copy_of_a_record_a_fetch_can_bring() -> None:
    producer = make_producer(SETTINGS, transactional=True)
    try:
        assert producer._max_request_size == MAX_REQUEST_BYTES > 50 * 1024 * 1024  # fetch_max_bytes
    finally:
        await producer.stop()


async def started(broker: FakeBroker) -> TransactionalProducer:
    producer = TransactionalProducer(SETTINGS, lambda: FakeProducer(broker, max_request_size=500))
    await producer.start()
    return producer


async def test_publishing_outside_a_batch_transaction_is_refused() -> None:
    producer = await started(FakeBroker())
    with pytest.raises(RuntimeError, match="only inside a batch's transaction"):
        await KafkaPublisher(producer).publish(DLQ_TOPIC, b"k", b"v", [])


async def test_a_lost_claim_stops_a_copy_before_it_is_sent() -> None:
    broker = FakeBroker()
    producer = await started(broker)
    owned = [True]
    with pytest.raises(Fenced):
        async with producer.transaction(lambda: owned[0]):
            owned[0] = False
            await KafkaPublisher(producer).publish(DLQ_TOPIC, b"k", b"v", [])
    assert broker.published == []


async def test_a_reference_dead_letter_keeps_every_header_of_its_copy() -> None:
    broker = FakeBroker()
    producer = await started(broker)
    record = Topic().create(7, 100, "x" * 1000)
    state = RetryState.from_headers((), Origin(record.topic, record.partition, record.offset))
    route = RetryPolicy(SETTINGS).route(state, ErrorClass.MODEL_ERROR, "model down")
    assert route.topic == RETRY_TOPIC
    async with producer.transaction(lambda: True) as txn:
        await KafkaPublisher(producer).publish(route.topic, record.key, record.value, route.headers)
    [reference] = broker.published
    assert (reference.topic, reference.key, reference.value) == (DLQ_TOPIC, record.key, None)
    assert reference.headers[: len(route.headers)] == route.headers
    assert reference.headers[-1][0] == H_PAYLOAD_DROPPED
    assert [s.payload_dropped for s in txn.sent] == [True]
