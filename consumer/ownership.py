"""Which partitions this member owns, and since when: the fence that keeps a batch from committing late.

A batch claims its partitions as they were when its first record of each was fetched. It may commit
(offsets, retry and dead-letter copies) only while every claim still holds: the partition was not
revoked or assigned again since, and the member is still in the same group generation. A member that
lost its partitions, to a rebalance it waited out too long or to an expired session, cannot tell the
broker so through aiokafka (its offset commits in a transaction carry no generation), so it checks here
before each step of the transaction and drops the batch instead; the new owner applies it again, which
the idempotent sink makes harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition


@dataclass(frozen=True, slots=True)
class Stamp:
    assignment: int  # which assignment of this member (counted by the rebalance listener)
    generation: int | None  # the group generation then, where aiokafka tells it


Claim = Mapping[TopicPartition, Stamp]
# The claim on a partition fetched before the rebalance listener stamped its assignment: it never holds
# (the listener counts from 1), and the partition is rewound, as aiokafka reset its position before.
UNSTAMPED = Stamp(assignment=0, generation=None)


def group_generation(consumer: AIOKafkaConsumer) -> int | None:
    """The group generation the member is in (-1 once it learned it was expelled); None if unknown.

    aiokafka has no public accessor. Its coordinator resets the generation as soon as a heartbeat finds
    the member gone, before the rebalance listener runs: the window in which a batch held through a
    broker outage would otherwise commit for partitions another member already owns.
    """
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    return generation if isinstance(generation, int) else None


class Ownership:
    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._assignments = 0
        self._owned: dict[TopicPartition, Stamp] = {}

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        self._assignments += 1
        stamp = Stamp(self._assignments, group_generation(self._consumer))
        for tp in partitions:
            self._owned[tp] = stamp

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._owned.pop(tp, None)

    def stamp(self, tp: TopicPartition) -> Stamp | None:
        return self._owned.get(tp)

    def lost(self, claim: Claim) -> list[TopicPartition]:
        """The claimed partitions that moved since the claim: revoked, assigned again, or expelled."""
        generation = group_generation(self._consumer)
        return sorted(
            tp
            for tp, stamp in claim.items()
            if self._owned.get(tp) != stamp or stamp.generation != generation
        )

    def expelled(self, claim: Claim) -> list[TopicPartition]:
        """The claimed partitions still assigned as claimed while the member left the generation."""
        generation = group_generation(self._consumer)
        return sorted(
            tp
            for tp, stamp in claim.items()
            if self._owned.get(tp) == stamp and stamp.generation != generation
        )

    def held(self, claim: Claim) -> list[TopicPartition]:
        """The claimed partitions this member owns now, under the claimed assignment or a later one: what
        a dropped batch rewinds to its first offset.

        A partition assigned again since the claim had its position reset to the committed offset, but
        a fetch after that, within the same batch, moved it past records that the drop discards: left
        there, the next batch would commit past them. The batch's first offset is at or before that
        committed offset, unless another member committed more in between (two rebalances within one
        batch), and then rewinding only applies its records again, which the sink makes a no-op.
        """
        return sorted(tp for tp in claim if tp in self._owned)
