"""Fault injection on the real stack: whatever happens, every change ends embedded, retried or
dead-lettered, exactly once, and the vector table matches the source table at the end."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.retry import H_ATTEMPT, H_ERROR_CLASS, H_ORIGINAL_OFFSET, H_ORIGINAL_PARTITION, H_ORIGINAL_TOPIC
from consumer.settings import Settings
from consumer.stack import LocalStack
from tests.fault.workload import Workload, read_topic
from tests.flaky_consumer import FAIL_ALWAYS, FAIL_TWICE
from tests.harness import cli, flaky_consumer, produce, wait_consistent

pytestmark = pytest.mark.fault


def run_scenario(
    settings: Settings, consumer: ConsumerProcess, id_base: int, fault: Callable[[], None]
) -> None:
    run_workload(settings, consumer, Workload(settings, id_base), fault)


def run_workload(
    settings: Settings, consumer: ConsumerProcess, workload: Workload, fault: Callable[[], None]
) -> set[int]:
    """Stream changes, inject the fault a few seconds in, then check that nothing was lost."""
    workload.start()
    time.sleep(3)
    fault()
    ids = workload.join()
    if not consumer.running():
        consumer.start()
    consumer.wait_ready()
    failing = workload.marked(FAIL_ALWAYS)
    with psycopg.connect(settings.dsn) as db:  # opened now: the fault may have been a Postgres restart
        wait_consistent_except(db, settings, sorted(ids - failing), failing)
    assert consumer.running(), consumer.tail()
    return ids


def wait_consistent_except(
    db: psycopg.Connection[Any], settings: Settings, ids: list[int], failing: set[int]
) -> None:
    wait_consistent(db, settings, ids, timeout_s=300)
    if failing:
        have = db.execute(
            "SELECT count(*) FROM public.document_embeddings WHERE id = ANY(%s) AND embedding IS NOT NULL",
            (sorted(failing),),
        ).fetchone()
        db.commit()
        assert have is not None and have[0] == 0, "rows whose model call always fails must have no vector"


def dead_letters_for(settings: Settings, ids: set[int]) -> list[tuple[int, dict[str, bytes]]]:
    letters = []
    for key, _, headers in read_topic(settings, settings.dlq_topic):
        try:
            key_id = json.loads(key or b"null")["id"]
        except (ValueError, TypeError, KeyError):
            key_id = None
        if key_id in ids:
            letters.append((key_id, headers))
    return letters


def assert_each_once(letters: list[tuple[int, dict[str, bytes]]]) -> None:
    coordinates = Counter(
        (h[H_ORIGINAL_TOPIC], h[H_ORIGINAL_PARTITION], h[H_ORIGINAL_OFFSET]) for _, h in letters
    )
    duplicated = {c: n for c, n in coordinates.items() if n > 1}
    assert not duplicated, f"dead-lettered more than once: {duplicated}"


def test_sigkill_mid_batch_then_restart(settings: Settings, pipeline: ConsumerProcess) -> None:
    def kill_twice() -> None:
        for pause in (0.0, 4.0):
            time.sleep(pause)
            pipeline.stop(signal.SIGKILL)
            pipeline.start().wait_ready()

    run_scenario(settings, pipeline, 3_000_000, kill_twice)


def test_postgres_down_for_30_seconds(
    settings: Settings, pipeline: ConsumerProcess, stack: LocalStack
) -> None:
    states: list[int] = []

    def outage() -> None:
        stack.postgres.stop()
        wait_until(lambda: pipeline.probe("/readyz") == 503, 30, "readiness to fail while Postgres is down")
        states.append(pipeline.metric_sum("cdc_embedder_paused_partitions") > 0)
        time.sleep(30)
        assert pipeline.probe("/livez") == 200, "liveness must not fail because Postgres is down"
        stack.postgres.start()
        wait_until(lambda: pipeline.probe("/readyz") == 200, 60, "readiness to return after Postgres is back")

    run_scenario(settings, pipeline, 3_100_000, outage)
    assert states and all(states), "partitions were not paused while Postgres was down"


def test_kafka_broker_restart(settings: Settings, pipeline: ConsumerProcess, stack: LocalStack) -> None:
    run_scenario(settings, pipeline, 3_200_000, stack.kafka.restart)


def model_failure_workload(settings: Settings) -> Workload:
    marks = {i: FAIL_ALWAYS for i in range(5, 300, 50)} | {i: FAIL_TWICE for i in range(30, 300, 50)}
    return Workload(settings, 3_300_000, marks=marks)


def test_embedder_failing_permanently_and_transiently(settings: Settings, pipeline: ConsumerProcess) -> None:
    workload = model_failure_workload(settings)
    failing = workload.marked(FAIL_ALWAYS)
    run_workload(settings, pipeline, workload, lambda: None)

    def all_dead() -> list[tuple[int, dict[str, bytes]]] | None:
        letters = dead_letters_for(settings, failing)
        return letters if {key for key, _ in letters} >= failing else None

    letters = wait_until(all_dead, 90, "every always-failing row in the dead-letter topic")
    assert all(h[H_ERROR_CLASS] == b"model_error" for _, h in letters)
    assert all(int(h[H_ATTEMPT]) == settings.retry_max_attempts for _, h in letters)
    assert_each_once(letters)


def test_garbage_in_the_source_topic(settings: Settings, pipeline: ConsumerProcess) -> None:
    poison = [
        (b'{"id": 3400001}', b"\x00\x01\x02 not json"),
        (b'{"id": 3400002}', b'{"op": "x", "source": {"lsn": 1}}'),
        (b'{"id": 3400003}', b"[1, 2, 3]"),
        (b"\xff\xfe", b"{}"),
        # near the topic's size limit: its dead-letter copy, headers added, must still be written
        (b'{"id": 3400004}', b"\x00" + bytes(range(256)) * 3900),
    ]
    dead_before = pipeline.metric_sum("cdc_embedder_dead_letters_total")

    def inject() -> None:
        asyncio.run(produce(settings, settings.source_topic, poison))

    run_scenario(settings, pipeline, 3_400_100, inject)
    wait_until(
        lambda: pipeline.metric_sum("cdc_embedder_dead_letters_total") >= dead_before + len(poison),
        60,
        "the poison messages to be dead-lettered",
    )
    letters = dead_letters_for(settings, {3_400_001, 3_400_002, 3_400_003, 3_400_004})
    assert sorted(h[H_ERROR_CLASS] for _, h in letters) == [
        b"invalid_event",
        b"invalid_json",
        b"invalid_json",
        b"unknown_operation",
    ]
    assert_each_once(letters)


def test_consumers_join_and_leave(
    settings: Settings, pipeline: ConsumerProcess, env: dict[str, str], logs_dir: Path
) -> None:
    extra = [flaky_consumer(env, logs_dir / f"member-{n}.log") for n in (2, 3)]

    def churn() -> None:
        for member in extra:
            member.start().wait_ready()
        time.sleep(3)
        assert extra[0].stop() == 0, extra[0].tail()

    try:
        run_scenario(settings, pipeline, 3_500_000, churn)
        assert extra[1].running(), extra[1].tail()
    finally:
        for member in extra:
            if member.running():
                member.stop()


def test_sigterm_mid_stream_exits_0_and_reapplies_nothing(
    settings: Settings, pipeline: ConsumerProcess
) -> None:
    marker = pipeline.log_file.stat().st_size
    offsets_before: dict[str, int] = {}
    restart_at: list[int] = []

    def terminate() -> None:
        started = time.monotonic()
        code = pipeline.stop(signal.SIGTERM)
        assert code == 0, pipeline.tail()
        assert time.monotonic() - started < settings.shutdown_grace_s + 5
        offsets_before.update(batch_offsets(pipeline.log_file, marker, last=True))
        restart_at.append(pipeline.log_file.stat().st_size)
        pipeline.start().wait_ready()

    run_scenario(settings, pipeline, 3_600_000, terminate)
    after = batch_offsets(pipeline.log_file, restart_at[0], last=False)
    again = {
        tp: (offsets_before[tp], first)
        for tp, first in after.items()
        if tp in offsets_before and first <= offsets_before[tp]
    }
    assert not again, f"records applied before the SIGTERM were applied again after the restart: {again}"


def batch_offsets(log_file: Path, start: int, last: bool) -> dict[str, int]:
    """Per partition, the last offset applied (last=True) or the first one (last=False) in the log."""
    found: dict[str, int] = {}
    with log_file.open("rb") as f:
        f.seek(start)
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") != "batch":
                continue
            for tp, (low, high) in entry.get("offsets", {}).items():
                if last:
                    found[tp] = max(found.get(tp, high), high)
                elif tp not in found:
                    found[tp] = low
    return found


def test_replaying_dead_letters_once_the_cause_is_fixed(
    settings: Settings, pipeline: ConsumerProcess, env: dict[str, str], logs_dir: Path
) -> None:
    """The always-failing rows of the model-failure scenario embed once a healthy model replays them."""
    failing = sorted(model_failure_workload(settings).marked(FAIL_ALWAYS))
    pipeline.stop()
    healthy = ConsumerProcess(env, logs_dir / "healthy.log").start().wait_ready()
    try:
        first = replay_cli(env, "--error-class", "model_error")
        assert first >= len(failing)
        with psycopg.connect(settings.dsn) as db:
            # the marker stays in the text, but this model does not fail on it
            wait_consistent(db, settings, failing, timeout_s=180)
            before = db.execute(
                "SELECT id, text_sha256, source_lsn, updated_at FROM public.document_embeddings "
                "WHERE id = ANY(%s) ORDER BY id",
                (failing,),
            ).fetchall()
            assert replay_cli(env, "--error-class", "model_error") == first
            wait_until(lambda: healthy.metric_sum("cdc_embedder_consumer_lag_messages") == 0, 120, "catch-up")
            time.sleep(2)
            db.commit()
            after = db.execute(
                "SELECT id, text_sha256, source_lsn, updated_at FROM public.document_embeddings "
                "WHERE id = ANY(%s) ORDER BY id",
                (failing,),
            ).fetchall()
            assert after == before, "replaying twice changed the vector table"
    finally:
        healthy.stop()
        pipeline.start().wait_ready()


def replay_cli(env: dict[str, str], *args: str) -> int:
    """`cdc-embedder replay-dlq ...` as a user runs it; returns how many records it says it replayed."""
    result = cli(env, "replay-dlq", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"replayed (\d+) of (\d+) dead letters", result.stdout)
    assert found, result.stdout + result.stderr
    return int(found.group(1))
