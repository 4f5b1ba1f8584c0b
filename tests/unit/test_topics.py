"""consumer.topics: what the retry and dead-letter topics are created with, and what is checked later."""

from __future__ import annotations

import pytest

from consumer.errors import ErrorClass
from consumer.events import Origin
from consumer.retry import RetryPolicy, RetryState
from consumer.settings import Settings, SettingsError, load_settings
from consumer.topics import (
    HEADER_HEADROOM_BYTES,
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    WEEK_MS,
    TopicSetupError,
    creation_errors,
    described_configs,
    fix_command,
    plan_topics,
    replication,
    retry_retention_ms,
    shortfalls,
)


def test_default_plan_on_three_brokers() -> None:
    retry, dlq = plan_topics(Settings(), source_partitions=6, source_max_message_bytes=2_000_000, brokers=3)
    assert (retry.name, dlq.name) == ("cdc-embedder.retry", "cdc-embedder.dlq")
    for plan in (retry, dlq):
        assert (plan.partitions, plan.replication_factor) == (6, 3)
        assert plan.configs["cleanup.policy"] == "delete"
        assert plan.configs["min.insync.replicas"] == "2"
        assert plan.configs["retention.bytes"] == "-1"
        assert int(plan.configs["max.message.bytes"]) == 2_000_000 + HEADER_HEADROOM_BYTES
    assert dlq.configs["retention.ms"] == "-1", "dead letters never expire"
    assert retry.configs["retention.ms"] == str(WEEK_MS)


@pytest.mark.parametrize(
    ("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2)), (0, (1, 1))]
)
def test_replication_follows_the_broker_count(brokers: int, expected: tuple[int, int]) -> None:
    assert replication(Settings(), brokers) == expected


def test_replication_settings_win() -> None:
    settings = Settings(topic_replication_factor=5, topic_min_insync_replicas=3)
    assert replication(settings, brokers=6) == (5, 3)
    assert replication(Settings(topic_replication_factor=4), brokers=6) == (4, 3)
    assert replication(Settings(topic_min_insync_replicas=1), brokers=3) == (3, 1)


def test_min_insync_above_the_computed_replication_is_refused() -> None:
    with pytest.raises(TopicSetupError, match="CDC_TOPIC_MIN_INSYNC_REPLICAS=2 exceeds the replication"):
        replication(Settings(topic_min_insync_replicas=2), brokers=1)


def test_partitions_setting_overrides_the_source_topics() -> None:
    plans = plan_topics(Settings(topic_partitions=12), 3, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, 3)
    assert [p.partitions for p in plans] == [12, 12]


@pytest.mark.parametrize(
    ("backoff_max_s", "attempts"), [(300.0, 5), (3600.0, 10), (86_400.0, 5), (1.0, 1), (604_800.0, 20)]
)
def test_retry_retention_outlasts_every_backoff(backoff_max_s: float, attempts: int) -> None:
    settings = Settings(
        retry_backoff_max_s=backoff_max_s, retry_backoff_initial_s=1.0, retry_max_attempts=attempts
    )
    retention = retry_retention_ms(settings)
    assert retention >= WEEK_MS
    assert retention >= 3 * backoff_max_s * attempts * 1000
    (retry, _) = plan_topics(settings, 3, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, 1)
    assert retry.configs["retention.ms"] == str(retention)


def test_headroom_covers_our_largest_headers() -> None:
    settings = Settings(topic_prefix="p" * 100, source_table="s" * 60 + "." + "t" * 60)
    state = RetryState(4, 1, 1, Origin(settings.source_topic, 2**31 - 1, 2**63 - 1))
    route = RetryPolicy(settings).route(state, ErrorClass.MODEL_ERROR, "é" * 10_000)
    header_bytes = sum(len(name.encode()) + len(value) for name, value in route.headers)
    assert header_bytes * 4 < HEADER_HEADROOM_BYTES


def test_a_finite_dead_letter_retention_falls_short() -> None:
    (_, dlq) = plan_topics(Settings(), 3, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, 3)
    actual = dlq.configs | {"retention.ms": str(WEEK_MS), "retention.bytes": "1073741824"}
    assert shortfalls(dlq.configs, actual) == {"retention.ms": "-1", "retention.bytes": "-1"}
    assert shortfalls(dlq.configs, dlq.configs) == {}


def test_retry_shortfalls() -> None:
    (retry, _) = plan_topics(Settings(), 3, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, 3)
    longer = retry.configs | {"retention.ms": str(4 * WEEK_MS), "max.message.bytes": str(10**8)}
    assert shortfalls(retry.configs, longer) == {}
    assert shortfalls(retry.configs, retry.configs | {"retention.ms": "-1"}) == {}
    short = retry.configs | {
        "retention.ms": "3600000",
        "cleanup.policy": "compact",
        "max.message.bytes": "1000",
    }
    assert shortfalls(retry.configs, short) == {
        "cleanup.policy": "delete",
        "retention.ms": retry.configs["retention.ms"],
        "max.message.bytes": retry.configs["max.message.bytes"],
    }


def test_configs_that_could_not_be_read_are_not_reported() -> None:
    (_, dlq) = plan_topics(Settings(), 3, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, 3)
    assert shortfalls(dlq.configs, {}) == {}


def test_fix_command_names_topic_and_values() -> None:
    command = fix_command("cdc.public.documents.dlq", {"retention.ms": "-1", "retention.bytes": "-1"})
    assert "--entity-name cdc.public.documents.dlq" in command
    assert "--add-config retention.ms=-1,retention.bytes=-1" in command


def test_described_configs_keeps_answered_topics_only() -> None:
    response = {
        "resources": [
            {
                "error_code": 0,
                "resource_name": "src",
                "config_entries": [
                    {"config_names": "max.message.bytes", "config_value": "2000000"},
                    {"config_names": "retention.ms", "config_value": "-1"},
                ],
            },
            {"error_code": 29, "resource_name": "denied", "config_entries": []},
        ]
    }
    assert described_configs([response]) == {"src": {"max.message.bytes": "2000000", "retention.ms": "-1"}}


def test_creation_errors_ignore_topics_that_exist() -> None:
    response = {
        "topic_errors": [
            {"topic": "a", "error_code": 0, "error_message": None},
            {"topic": "b", "error_code": 36, "error_message": "exists"},
            {
                "topic": "c",
                "error_code": 38,
                "error_message": "Replication factor: 3 larger than brokers: 1.",
            },
            {"topic": "d", "error_code": 29},
        ]
    }
    errors = creation_errors(response)
    assert set(errors) == {"c", "d"}
    assert errors["c"].startswith("InvalidReplicationFactorError: Replication factor: 3")
    assert errors["d"] == "TopicAuthorizationFailedError"


def test_settings_refuse_more_insync_replicas_than_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_TOPIC_REPLICATION_FACTOR", "2")
    monkeypatch.setenv("CDC_TOPIC_MIN_INSYNC_REPLICAS", "3")
    with pytest.raises(SettingsError, match="CDC_TOPIC_MIN_INSYNC_REPLICAS must not exceed"):
        load_settings()
