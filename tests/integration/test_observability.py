"""Every dashboard and alert expression works against a real Prometheus scraping the real consumer.

A real ``prometheus`` server (Debian package, ``make system-deps``) is started on a free port with its own
config and TSDB in a temporary directory. It scrapes the consumer of the session ``pipeline`` fixture
(which has processed events, dead-lettered one, retried one and holds partitions) every second under the
job name the alert rules expect, and loads ``deploy/observability/alert-rules.yml``. After a few scrapes,
each expression is run through ``/api/v1/query``:

* dashboard panel queries (after Grafana variable substitution) and the PromQL inside the dashboard's
  variable queries must be valid and return data: an empty result means the dashboard charts a series
  the consumer never exported;
* alert expressions must be valid. Their full result is normally empty while all is well
  (``... dead letters > 0``), so what must return data are their *probes*: the expression with each
  comparison removed (its left-hand side), both sides of ``and``/``or``, the left of ``unless``, and the
  argument of ``absent()`` (see ``probe_expressions`` in ``tests/unit/test_alert_rules.py``). The
  "new dead-letter series" clause of CdcEmbedderDeadLetters (``x unless x offset 10m``) returns data
  here because this Prometheus' TSDB starts empty;
* every metric name the expressions use must be among the series Prometheus scraped from the consumer,
  and every histogram they use must have observations.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import yaml

from consumer.consumer_process import ConsumerProcess, wait_until
from consumer.settings import Settings
from tests.fault_proxy import StatusProxy
from tests.harness import corpus_rows, exercise, insert_rows
from tests.infinity import API_KEY, InfinityServer, openai_env

pytestmark = pytest.mark.integration

MIN_SCRAPES = 5
OBSERVED_IDS = 9_100_000  # rows this module inserts, apart from every other test's
STARTUP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.5


def _load_observability_helpers() -> ModuleType:
    """The expression lists and the PromQL reader, shared with the unit test of the same files."""
    path = Path(__file__).resolve().parents[1] / "unit" / "test_alert_rules.py"
    name = "_cdc_embedder_observability_helpers"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


obs = _load_observability_helpers()
SCRAPE_JOB: str = obs.SCRAPE_JOB
DASHBOARD_EXPRESSIONS: list[Any] = obs.dashboard_expressions() + obs.dashboard_variable_queries()
RULE_EXPRESSIONS: list[Any] = obs.rule_expressions()
RULE_PROBES: list[tuple[str, str]] = [
    (f"{e.origin} probe {i}", probe)
    for e in RULE_EXPRESSIONS
    for i, probe in enumerate(obs.probe_expressions(e.promql))
]


@dataclass(frozen=True)
class Prometheus:
    url: str
    log_path: Path

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10.0)
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise AssertionError(f"GET {path}: HTTP {response.status_code}: {response.text[:500]}") from None
        return body

    def query(self, promql: str) -> dict[str, Any]:
        return self.get("/api/v1/query", {"query": promql})

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus is not installed: run `make system-deps` (installs the Debian package `prometheus`)",
            pytrace=False,
        )
    return path


def _wait_for(
    what: str, check: Callable[[], str], server: Prometheus, process: subprocess.Popen[bytes]
) -> None:
    """Poll ``check()`` until it returns a falsy "still waiting" reason; fail with the last one."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    reason = "not checked"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{server.log_tail()}", pytrace=False)
        try:
            reason = check()
        except httpx.HTTPError as error:
            reason = repr(error)
        if not reason:
            return
        time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"timed out waiting for {what}: {reason}\n{server.log_tail()}", pytrace=False)


def _successful_scrapes(server: Prometheus) -> int:
    body = server.query(f'count_over_time(up{{job="{SCRAPE_JOB}"}}[5m]) and up{{job="{SCRAPE_JOB}"}} == 1')
    result = body.get("data", {}).get("result", [])
    return int(float(result[0]["value"][1])) if result else 0


def _scraped_enough(server: Prometheus) -> str:
    scrapes = _successful_scrapes(server)
    if scrapes >= MIN_SCRAPES:
        return ""
    targets = server.get("/api/v1/targets").get("data", {}).get("activeTargets", [])
    errors = [f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets]
    return f"{scrapes} successful scrapes so far; targets: {errors}"


def _rules_evaluated(server: Prometheus) -> str:
    groups = server.get("/api/v1/rules").get("data", {}).get("groups", [])
    rules = [rule for group in groups for rule in group["rules"]]
    pending = [r["name"] for r in rules if r.get("lastEvaluation", "").startswith("0001-")]
    if not rules or pending:
        return f"rules not evaluated yet: {pending or 'none loaded'}"
    return ""


@pytest.fixture(scope="module")
def remote_pipeline(
    pipeline: ConsumerProcess, env: dict[str, str], infinity: InfinityServer, logs_dir: Path
) -> Iterator[ConsumerProcess]:
    """A consumer with CDC_EMBEDDER=openai (infinity behind a proxy that rate-limits its first request),
    so that the embedding server's panels and alert have series too."""
    proxy = StatusProxy(infinity.base_url, rate_limit_first=1).start()
    remote_env = openai_env(env, proxy.base_url, API_KEY, "embeddings_observed")
    consumer = ConsumerProcess(remote_env, logs_dir / "observed-openai.log").start().wait_ready()
    yield consumer
    consumer.stop()
    proxy.stop()


def exercise_remote(consumer: ConsumerProcess, settings: Settings) -> None:
    with psycopg.connect(settings.dsn) as conn:
        insert_rows(conn, corpus_rows(10, skip=57_400, id_base=OBSERVED_IDS + 50_000))
    wait_until(
        lambda: (
            consumer.metric_sum("cdc_embedder_tokens_billed_total") > 0
            and consumer.metric_sum("cdc_embedder_embed_rate_limited_total") > 0
        ),
        180,
        "the openai consumer to be rate limited once and embed",
    )


@pytest.fixture(scope="module")
def prometheus(
    pipeline: ConsumerProcess,
    remote_pipeline: ConsumerProcess,
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    binary = _prometheus_binary()
    metrics_url = urlsplit(pipeline.metrics_url)
    assert metrics_url.hostname and metrics_url.port, f"unexpected metrics_url {pipeline.metrics_url!r}"
    remote_url = urlsplit(remote_pipeline.metrics_url)
    workdir = tmp_path_factory.mktemp("prometheus")
    config_path = workdir / "prometheus.yml"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(obs.RULES_PATH)],
        "scrape_configs": [
            {
                "job_name": SCRAPE_JOB,
                "scheme": metrics_url.scheme or "http",
                "metrics_path": metrics_url.path or "/metrics",
                "static_configs": [
                    {
                        "targets": [
                            f"{metrics_url.hostname}:{metrics_url.port}",
                            f"{remote_url.hostname}:{remote_url.port}",
                        ]
                    }
                ],
            }
        ],
    }
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    server = Prometheus(url=f"http://127.0.0.1:{port}", log_path=workdir / "prometheus.log")
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        _wait_for("Prometheus to be ready", lambda: _ready(server), server, process)
        scrapes = f"{MIN_SCRAPES} successful scrapes of {pipeline.metrics_url}"
        _wait_for(scrapes, lambda: _scraped_enough(server), server, process)
        # Traffic while Prometheus watches: rates and increases need samples on both sides of it, and
        # the session's consumer may be a fresh process (the fault tests restart it) with no history.
        exercise(pipeline, settings, OBSERVED_IDS)
        exercise_remote(remote_pipeline, settings)
        scraped_before = _successful_scrapes(server)
        _wait_for(
            "scrapes after the traffic",
            lambda: "" if _successful_scrapes(server) >= scraped_before + MIN_SCRAPES else "waiting",
            server,
            process,
        )
        _wait_for("the alert rules to be evaluated", lambda: _rules_evaluated(server), server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _ready(server: Prometheus) -> str:
    response = httpx.get(f"{server.url}/-/ready", timeout=2.0)
    return "" if response.status_code == 200 else f"/-/ready: HTTP {response.status_code}"


def _run(server: Prometheus, origin: str, promql: str) -> list[dict[str, Any]] | None:
    """Run an instant query; fail unless it is valid. Returns the vector (None for a scalar or string)."""
    body = server.query(promql)
    assert body.get("status") == "success", (
        f"{origin}: Prometheus rejected {promql!r}: {body.get('errorType')}: {body.get('error')}"
    )
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return None
    result: list[dict[str, Any]] = data["result"]
    return result


def _assert_returns_data(server: Prometheus, origin: str, promql: str) -> None:
    result = _run(server, origin, promql)
    assert result is None or result, (
        f"{origin}: {promql!r} returned no data: a series it selects was never exported by the consumer "
        "(or a labelled series was never created)"
    )


def _ids(items: list[Any]) -> list[str]:
    return [item.origin if hasattr(item, "origin") else item[0] for item in items]


@pytest.mark.parametrize("expression", DASHBOARD_EXPRESSIONS, ids=_ids(DASHBOARD_EXPRESSIONS))
def test_dashboard_expression_returns_data(prometheus: Prometheus, expression: Any) -> None:
    _assert_returns_data(prometheus, expression.origin, expression.promql)


@pytest.mark.parametrize("expression", RULE_EXPRESSIONS, ids=_ids(RULE_EXPRESSIONS))
def test_alert_expression_is_valid(prometheus: Prometheus, expression: Any) -> None:
    _run(prometheus, expression.origin, expression.promql)


@pytest.mark.parametrize(("origin", "probe"), RULE_PROBES, ids=_ids(RULE_PROBES))
def test_alert_expression_without_its_comparisons_returns_data(
    prometheus: Prometheus, origin: str, probe: str
) -> None:
    _assert_returns_data(prometheus, origin, probe)


def test_alert_rules_are_loaded_and_healthy(prometheus: Prometheus) -> None:
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {e.origin.removeprefix("alert ").removeprefix("record ") for e in RULE_EXPRESSIONS}
    assert set(rules) == expected
    unhealthy = {name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"}
    assert not unhealthy, f"rules failing to evaluate: {unhealthy}"


def test_every_metric_used_is_scraped_from_the_consumer(prometheus: Prometheus) -> None:
    body = prometheus.get("/api/v1/label/__name__/values", {"match[]": f'{{job="{SCRAPE_JOB}"}}'})
    scraped = set(body["data"])
    assert "cdc_embedder_events_total" in scraped, f"scraped names: {sorted(scraped)}"
    missing = [
        f"{e.origin}: {name}"
        for e in DASHBOARD_EXPRESSIONS + RULE_EXPRESSIONS
        for name in sorted(obs.promql_metric_names(e.promql) - scraped)
    ]
    assert not missing, "metrics used but not exported by the running consumer:\n" + "\n".join(missing)


def test_every_histogram_used_has_observations(prometheus: Prometheus) -> None:
    """histogram_quantile() over a histogram nobody observes is NaN: the panel would be blank."""
    histograms = sorted(
        {
            name.removesuffix("_bucket")
            for e in DASHBOARD_EXPRESSIONS + RULE_EXPRESSIONS
            for name in obs.promql_metric_names(e.promql)
            if name.endswith("_bucket")
        }
    )
    assert histograms
    empty = []
    for histogram in histograms:
        result = _run(prometheus, histogram, f'sum({histogram}_count{{job="{SCRAPE_JOB}"}})')
        if not result or not math.isfinite(float(result[0]["value"][1])) or float(result[0]["value"][1]) <= 0:
            empty.append(histogram)
    assert not empty, f"histograms with no observations: {empty}"
