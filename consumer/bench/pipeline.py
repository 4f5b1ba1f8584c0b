"""The real pipeline under the bench: its own stack folder and ports, the connector, a consumer process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# Apart from a developer's `.stack` (defaults) and the tests' `.stack-test`, so all three can run at once.
BENCH_STACK_ENV = {
    "CDC_STACK_DIR": str(REPO / ".stack-bench"),
    "CDC_STACK_PG_PORT": "56439",
    "CDC_STACK_KAFKA_PORT": "39092",
    "CDC_STACK_KAFKA_CONTROLLER_PORT": "39093",
    "CDC_STACK_CONNECT_PORT": "38083",
    "CDC_LOG_FORMAT": "json",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
METRICS = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def create_source_table(settings: Settings) -> None:
    """The demo source table (its updated_at, now() at insert, is a one-row insert's commit time) and the
    publication Debezium reads it through."""
    from consumer.connectors import publication_name
    from consumer.schema import create_demo_source_table

    async def create() -> None:
        async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
            await create_demo_source_table(conn, settings, publication_name(settings))

    asyncio.run(create())


def bench_env(model_folder: Path) -> dict[str, str]:
    """The caller's CDC_* settings, with the bench's stack folder, ports and model on top."""
    inherited = {k: v for k, v in os.environ.items() if k.startswith("CDC_")}
    return {**inherited, **BENCH_STACK_ENV, "CDC_MODEL": str(model_folder)}


def settings_from(env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("CDC_").lower(): v for k, v in env.items() if k.startswith("CDC_")}
    return Settings.model_validate(fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Consumer:
    """`cdc-embedder run` as users run it: a process with its own HTTP port, logging to a file."""

    env: dict[str, str]
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Consumer:
        env = {**os.environ, **self.env, "CDC_HTTP_PORT": str(self.port)}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = 300) -> Consumer:
        def ready() -> bool:
            if not self.running():
                raise RuntimeError(f"consumer exited; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=3) as r:
                    return int(r.status) == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, timeout_s, "the consumer to be ready", every_s=0.5)
        return self

    def metrics(self) -> METRICS:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


def histogram_buckets(before: METRICS, after: METRICS, name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) buckets of a histogram's growth between two scrapes."""
    growth: dict[float, float] = {}
    for (metric, labels), value in after.items():
        if metric == f"{name}_bucket":
            bound = float(dict(labels)["le"])
            growth[bound] = value - before.get((metric, labels), 0.0)
    return sorted(growth.items())


def set_connector_paused(settings: Settings, name: str, paused: bool, timeout_s: float = 60) -> None:
    """PUT /connectors/<name>/pause|resume and wait until its state says so."""
    base = settings.connect_rest_url
    httpx.put(f"{base}/connectors/{name}/{'pause' if paused else 'resume'}", timeout=30).raise_for_status()
    want = "PAUSED" if paused else "RUNNING"

    def reached() -> bool:
        status = httpx.get(f"{base}/connectors/{name}/status", timeout=30).json()
        states = [status["connector"]["state"], *(t["state"] for t in status.get("tasks", []))]
        return all(s == want for s in states)

    wait_until(reached, timeout_s, f"connector {name} to be {want}", every_s=0.5)


def vector_count(conn: psycopg.Connection[Any], settings: Settings, low: int, high: int) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM {settings.vector_table} WHERE id >= %s AND id < %s AND embedding IS NOT NULL",
        (low, high),
    ).fetchone()
    conn.commit()
    return int(row[0]) if row else 0
