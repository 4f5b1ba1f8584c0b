"""consumer.health: the probe logic with a fake clock, and the HTTP endpoint on a loopback port."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import Info
from prometheus_client.parser import text_string_to_metric_families

from consumer import metrics
from consumer.health import HealthState, heartbeat, serve


@dataclass
class FakeClock:
    now: float = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> HealthState:
    return HealthState(stall_after_s=30.0, clock=clock)


def make_ready(state: HealthState) -> None:
    state.started = state.database_ok = state.partitions_assigned = True


# --- HealthState ----------------------------------------------------------------------------------


def test_live_until_the_loop_stalls(state: HealthState, clock: FakeClock) -> None:
    assert state.live() == (True, "ok")
    clock.now += 30.0
    assert state.loop_stalled_for() == 30.0
    assert state.live() == (True, "ok")  # at the limit, still alive
    clock.now += 0.5
    assert state.live() == (False, "event loop made no progress for 30.5s")
    state.tick()
    assert state.loop_stalled_for() == 0.0
    assert state.live() == (True, "ok")


def test_tick_sets_the_heartbeat_gauge(state: HealthState) -> None:
    metrics.LOOP_HEARTBEAT_TIMESTAMP.set(0)
    state.tick()
    assert metrics.LOOP_HEARTBEAT_TIMESTAMP._value.get() > 1_600_000_000


def test_ready_reports_the_first_missing_condition(state: HealthState) -> None:
    assert state.ready() == (False, "starting")
    state.database_ok = state.partitions_assigned = True
    assert state.ready() == (False, "starting")
    state.started = True
    state.database_ok = False
    assert state.ready() == (False, "database unavailable")
    state.database_ok = True
    state.partitions_assigned = False
    assert state.ready() == (False, "no partitions assigned")
    state.partitions_assigned = True
    assert state.ready() == (True, "ok")


def test_an_operator_error_makes_the_consumer_not_ready_and_says_what_to_fix(state: HealthState) -> None:
    make_ready(state)
    state.operator_error = "the database is read-only: point CDC_DATABASE_URL at the primary"
    state.database_ok = False
    assert state.ready() == (
        False,
        "operator error: the database is read-only: point CDC_DATABASE_URL at the primary",
    )
    state.operator_error = None
    state.database_ok = True
    assert state.ready() == (True, "ok")


def test_a_stalled_model_call_fails_liveness_for_a_restart(state: HealthState) -> None:
    assert state.live() == (True, "ok")
    state.model_stall()
    alive, reason = state.live()
    assert alive is False and "CDC_MODEL_TIMEOUT_S" in reason


def test_startup(state: HealthState) -> None:
    assert state.startup() == (False, "loading model")
    state.started = True
    assert state.startup() == (True, "ok")


def test_readiness_does_not_depend_on_liveness(state: HealthState, clock: FakeClock) -> None:
    make_ready(state)
    clock.now += 3600
    assert state.live()[0] is False
    assert state.ready() == (True, "ok")


async def test_heartbeat_ticks_while_the_loop_runs(state: HealthState, clock: FakeClock) -> None:
    clock.now += 100
    assert state.loop_stalled_for() == 100
    task = asyncio.create_task(heartbeat(state))
    await asyncio.sleep(0)
    try:
        assert state.loop_stalled_for() == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the HTTP endpoint ----------------------------------------------------------------------------


@dataclass
class Served:
    state: HealthState
    clock: FakeClock
    url: str


@pytest.fixture(scope="module")
def served_module() -> Iterator[Served]:
    """One server for the module (each shutdown waits out a 0.5 s poll interval)."""
    clock = FakeClock()
    state = HealthState(stall_after_s=30.0, clock=clock)
    server = serve(state, "127.0.0.1", 0)
    try:
        assert server.server_port != 0
        yield Served(state, clock, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(served_module: Served) -> Served:
    """The shared server, its state back to a fresh start."""
    served_module.clock.now = 500.0
    served_module.state.tick()
    served_module.state.started = served_module.state.database_ok = False
    served_module.state.partitions_assigned = False
    return served_module


@pytest.fixture
def base_url(served: Served) -> str:
    return served.url


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_probes_while_starting(base_url: str) -> None:
    assert get(f"{base_url}/livez")[::2] == (200, "ok\n")
    assert get(f"{base_url}/readyz")[::2] == (503, "starting\n")
    assert get(f"{base_url}/startupz")[::2] == (503, "loading model\n")


def test_probes_when_ready(base_url: str, served: Served) -> None:
    make_ready(served.state)
    for path in ("/livez", "/readyz", "/startupz"):
        status, content_type, body = get(base_url + path)
        assert (status, body) == (200, "ok\n")
        assert content_type == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("break_it", "path", "body"),
    [
        ("database_ok", "/readyz", "database unavailable\n"),
        ("partitions_assigned", "/readyz", "no partitions assigned\n"),
        ("started", "/startupz", "loading model\n"),
    ],
)
def test_probe_failures_answer_503(
    base_url: str, served: Served, break_it: str, path: str, body: str
) -> None:
    make_ready(served.state)
    setattr(served.state, break_it, False)
    assert get(base_url + path)[::2] == (503, body)


def test_stalled_loop_fails_liveness_only(base_url: str, served: Served) -> None:
    state = served.state
    make_ready(state)
    served.clock.now += 31
    assert get(f"{base_url}/livez")[::2] == (503, "event loop made no progress for 31.0s\n")
    assert get(f"{base_url}/readyz")[0] == 200
    state.tick()
    assert get(f"{base_url}/livez")[::2] == (200, "ok\n")


def test_query_string_is_ignored(base_url: str, served: Served) -> None:
    make_ready(served.state)
    assert get(f"{base_url}/readyz?verbose=1")[::2] == (200, "ok\n")


def test_unknown_path_is_404(base_url: str) -> None:
    assert get(f"{base_url}/healthz")[::2] == (404, "not found\n")
    assert get(f"{base_url}/")[0] == 404


def test_metrics_endpoint_serves_the_cdc_embedder_series(base_url: str) -> None:
    metrics.count_event("documents", "create", "embedded")
    metrics.BATCHES.inc()
    metrics.record_build_info()
    metrics.record_model_info("documents", "fake-model", 4, "float32")  # an Info is exported once it is set
    status, content_type, body = get(f"{base_url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    # every metric the module defines is exported, with the one prefix
    for name, obj in vars(metrics).items():
        if name.isupper() and hasattr(obj, "_name") and name not in {"PREFIX", "OUTCOMES"}:
            assert obj._name.startswith("cdc_embedder_")
            family = obj._name + ("_info" if isinstance(obj, Info) else "")  # text format: a gauge
            assert family in families, family
    for expected in (
        "cdc_embedder_events",
        "cdc_embedder_batches",
        "cdc_embedder_model_seconds",
        "cdc_embedder_end_to_end_seconds",
        "cdc_embedder_consumer_lag_messages",
        "cdc_embedder_event_loop_heartbeat_timestamp_seconds",
        "cdc_embedder_dead_letters",
        "cdc_embedder_model_info",
        "cdc_embedder_build_info",
    ):
        assert expected in families
    assert "cdc_embedder_events_total{" in body
    events = [s for s in families["cdc_embedder_events"].samples if s.name == "cdc_embedder_events_total"]
    embedded = {"pipeline": "documents", "op": "create", "outcome": "embedded"}
    assert any(s.labels == embedded and s.value >= 1 for s in events)
    [model] = families["cdc_embedder_model_info"].samples
    assert model.labels == {
        "pipeline": "documents",
        "name": "fake-model",
        "dimension": "4",
        "dtype": "float32",
    }
