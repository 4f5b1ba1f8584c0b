"""consumer.kafka.wait_for_topic and ensure_topics against a fake admin client (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource
from aiokafka.errors import KafkaConnectionError
from structlog.testing import capture_logs

from consumer import service
from consumer.kafka import ensure_topics, wait_for_topic
from consumer.settings import Settings
from consumer.topics import HEADER_HEADROOM_BYTES, TopicSetupError, plan_topics

SOURCE = "cdc.public.documents"


class _Answer:
    def __init__(self, obj: dict[str, Any]) -> None:
        self._obj = obj

    def to_object(self) -> dict[str, Any]:
        return self._obj


class FakeAdmin:
    def __init__(self, topics: dict[str, int], configs: dict[str, dict[str, str]], brokers: int = 3) -> None:
        self.topics = topics  # name -> partitions
        self.configs = configs
        self.brokers = brokers
        self.described: list[str] = []
        self.created: list[NewTopic] = []
        self.create_error: tuple[int, str] | None = None
        self.listing: list[Callable[[], None]] = []  # run one per list_topics call, before answering

    async def list_topics(self) -> list[str]:
        if self.listing:
            self.listing.pop(0)()
        return list(self.topics)

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        self.described += topics
        return [
            {
                "topic": t,
                "error_code": 0 if t in self.topics else 3,
                "partitions": [{}] * self.topics.get(t, 0),
            }
            for t in topics
        ]

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": i} for i in range(self.brokers)]}

    async def describe_configs(self, resources: list[ConfigResource]) -> list[_Answer]:
        return [
            _Answer(
                {
                    "resources": [
                        {
                            "error_code": 0 if r.name in self.configs else 29,
                            "resource_name": r.name,
                            "config_entries": [
                                {"config_names": k, "config_value": v}
                                for k, v in self.configs.get(r.name, {}).items()
                                if k in r.configs
                            ],
                        }
                        for r in resources
                    ]
                }
            )
        ]

    async def create_topics(self, new_topics: list[NewTopic]) -> _Answer:
        self.created += new_topics
        code, message = self.create_error or (0, "")
        return _Answer({"topic_errors": [{"topic": t.name, "error_code": code, "error_message": message}
                                         for t in new_topics]})  # fmt: skip


def _admin(fake: FakeAdmin) -> AIOKafkaAdminClient:
    return cast(AIOKafkaAdminClient, fake)


async def test_creates_retry_and_dead_letter_topics_like_the_source() -> None:
    settings = Settings()
    fake = FakeAdmin({SOURCE: 6}, {SOURCE: {"max.message.bytes": "5242880"}}, brokers=3)
    await ensure_topics(_admin(fake), settings)
    expected = plan_topics(settings, 6, 5_242_880, 3)
    assert [(t.name, t.num_partitions, t.replication_factor, t.topic_configs) for t in fake.created] == [
        (p.name, p.partitions, p.replication_factor, p.configs) for p in expected
    ]
    dlq = fake.created[1]
    assert dlq.topic_configs["retention.ms"] == dlq.topic_configs["retention.bytes"] == "-1"
    assert int(dlq.topic_configs["max.message.bytes"]) == 5_242_880 + HEADER_HEADROOM_BYTES
    assert fake.described == [SOURCE], "a missing topic is never described (it could be auto-created)"


async def test_the_shared_topics_fit_every_pipelines_source() -> None:
    """As many partitions as the widest source topic, room for the largest record of any."""
    other = "cdc.support.tickets"
    fake = FakeAdmin(
        {SOURCE: 3, other: 12},
        {SOURCE: {"max.message.bytes": "8388608"}, other: {"max.message.bytes": "1048588"}},
    )
    await ensure_topics(_admin(fake), Settings(), [SOURCE, other])
    assert {(t.name, t.num_partitions) for t in fake.created} == {
        ("cdc-embedder.retry", 12),
        ("cdc-embedder.dlq", 12),
    }
    assert {int(t.topic_configs["max.message.bytes"]) for t in fake.created} == {
        8_388_608 + HEADER_HEADROOM_BYTES
    }


async def test_existing_finite_dead_letter_topic_gets_a_warning_naming_the_fix() -> None:
    dlq = "cdc-embedder.dlq"
    fake = FakeAdmin(
        {SOURCE: 3, dlq: 3},
        {
            SOURCE: {"max.message.bytes": "1048588"},
            dlq: {"retention.ms": "604800000", "cleanup.policy": "delete"},
        },
    )
    with capture_logs() as logs:
        await ensure_topics(_admin(fake), Settings())
    assert [t.name for t in fake.created] == ["cdc-embedder.retry"]
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["topic"] == dlq
    assert warning["have"] == {"retention.ms": "604800000"}
    assert f"--entity-name {dlq} --add-config retention.ms=-1" in warning["fix"]


async def test_unreadable_source_config_assumes_kafkas_default() -> None:
    fake = FakeAdmin({SOURCE: 3}, {})
    with capture_logs() as logs:
        await ensure_topics(_admin(fake), Settings())
    assert any("max.message.bytes" in e["event"] for e in logs if e["log_level"] == "warning")
    assert fake.created[0].topic_configs["max.message.bytes"] == str(1_048_588 + HEADER_HEADROOM_BYTES)


async def test_a_refused_creation_is_an_operator_error() -> None:
    fake = FakeAdmin({SOURCE: 3}, {SOURCE: {"max.message.bytes": "1048588"}}, brokers=1)
    fake.create_error = (38, "Replication factor: 3 larger than available brokers: 1.")
    with pytest.raises(TopicSetupError, match=r"InvalidReplicationFactorError.*CDC_TOPIC_REPLICATION_FACTOR"):
        await ensure_topics(_admin(fake), Settings(topic_replication_factor=3))


async def test_wait_returns_once_the_topic_exists_and_says_so() -> None:
    fake = FakeAdmin({}, {})

    def fail() -> None:
        raise KafkaConnectionError("broker restarting")

    fake.listing = [fail, lambda: None, lambda: fake.topics.update({SOURCE: 3})]
    with capture_logs() as logs:
        assert await wait_for_topic(_admin(fake), SOURCE, asyncio.Event(), poll_s=0) is True
    events = [e["event"] for e in logs]
    assert "listing topics failed; retrying" in events
    assert "waiting for the topic" in events
    assert events[-1] == "topic appeared"
    assert all(e["log_level"] in {"info", "warning"} for e in logs)


async def test_wait_ends_on_shutdown_without_the_topic() -> None:
    fake = FakeAdmin({}, {})
    stop = asyncio.Event()
    fake.listing = [lambda: None, stop.set]
    assert await wait_for_topic(_admin(fake), SOURCE, stop, poll_s=0) is False
    assert fake.listing == []
    assert fake.created == []


async def test_wait_for_an_existing_topic_logs_nothing() -> None:
    fake = FakeAdmin({SOURCE: 3}, {})
    with capture_logs() as logs:
        assert await wait_for_topic(_admin(fake), SOURCE, asyncio.Event()) is True
    assert logs == []


@pytest.fixture
def service_admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    """The admin client consumer.service gets."""
    fake = FakeAdmin({}, {SOURCE: {"max.message.bytes": "1048588"}})

    @contextlib.asynccontextmanager
    async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
        yield _admin(fake)

    monkeypatch.setattr(service, "admin_client", admin_client)
    return fake


async def test_start_up_creates_the_topics_once_the_source_exists(service_admin: FakeAdmin) -> None:
    service_admin.topics[SOURCE] = 3
    assert await service._prepare_topics(Settings(), [SOURCE], asyncio.Event()) is True
    assert [t.name for t in service_admin.created] == ["cdc-embedder.retry", "cdc-embedder.dlq"]


async def test_shutdown_during_the_wait_creates_nothing(service_admin: FakeAdmin) -> None:
    stop = asyncio.Event()
    stop.set()
    assert await service._prepare_topics(Settings(), [SOURCE], stop) is False
    assert service_admin.created == [] and service_admin.described == []
