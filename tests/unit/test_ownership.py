"""consumer.ownership: when a batch's claim on its partitions stops holding, and what to rewind then."""

from __future__ import annotations

from aiokafka import TopicPartition

from consumer.ownership import UNSTAMPED, Claim, Ownership, Stamp
from tests.unit.fakes import SOURCE_TOPIC
from tests.unit.kafka_fakes import FakeBroker, FakeConsumer

TP0, TP1 = TopicPartition(SOURCE_TOPIC, 0), TopicPartition(SOURCE_TOPIC, 1)


def owned() -> tuple[Ownership, FakeConsumer]:
    consumer = FakeConsumer(FakeBroker())
    ownership = Ownership(consumer)
    consumer._coordinator.generation = 7
    ownership.assigned({TP0, TP1})
    return ownership, consumer


def claim_of(ownership: Ownership, *partitions: TopicPartition) -> Claim:
    stamps = {tp: ownership.stamp(tp) for tp in partitions}
    return {tp: stamp for tp, stamp in stamps.items() if isinstance(stamp, Stamp)}


def test_a_claim_holds_while_nothing_moved() -> None:
    ownership, _ = owned()
    claim = claim_of(ownership, TP0, TP1)
    assert ownership.lost(claim) == [] and ownership.held(claim) == [TP0, TP1]


def test_a_revoked_partition_is_lost_and_not_rewound_one_assigned_again_is_rewound() -> None:
    ownership, _ = owned()
    claim = claim_of(ownership, TP0, TP1)
    ownership.revoked({TP0, TP1})
    ownership.assigned({TP1})  # from the committed offset, but the batch may have fetched past it since
    assert ownership.lost(claim) == [TP0, TP1]
    assert ownership.held(claim) == [TP1]


def test_an_expelled_member_loses_its_claims_before_any_listener_runs() -> None:
    ownership, consumer = owned()
    claim = claim_of(ownership, TP0)
    consumer.expel()
    assert ownership.lost(claim) == ownership.expelled(claim) == [TP0]
    assert ownership.held(claim) == [TP0]  # still assigned: rewind it


def test_a_partition_fetched_before_its_assignment_was_stamped_is_lost_and_rewound() -> None:
    ownership, _ = owned()
    claim = {TP0: UNSTAMPED}
    assert ownership.lost(claim) == ownership.held(claim) == [TP0]
    assert ownership.expelled(claim) == []
