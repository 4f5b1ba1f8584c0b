"""`cdc-embedder run` as a supervised process: start it, probe and scrape it, signal it.

The benchmark and the integration and fault tests drive the consumer the way Kubernetes does, as a
process with its own HTTP port, so that SIGTERM, SIGKILL and restarts are the real thing.
"""

from __future__ import annotations

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

from prometheus_client.parser import text_string_to_metric_families

from consumer.health import METRICS_PATH, READINESS_PATH
from consumer.metrics import PREFIX
from consumer.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RUN = [sys.executable, "-m", "consumer.cli", "run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


AUDIT_TIMESTAMP = f"{PREFIX}_audit_last_timestamp_seconds"


@dataclass
class ConsumerProcess:
    env: dict[str, str]  # CDC_* settings on top of this process's environment
    log_file: Path
    argv: list[str] = field(default_factory=lambda: list(RUN))
    port: int = field(default_factory=free_port)
    # started on these CPUs: OpenVINO's thread pool runs on those the process had at its start, whatever
    # affinity it is given later
    cpus: set[int] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return self.url + METRICS_PATH

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> ConsumerProcess:
        env = {**os.environ, **self.env, "CDC_HTTP_PORT": str(self.port)}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            cpus = self.cpus
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def probe(self, path: str) -> int:
        """HTTP status of a probe; 0 when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self, timeout_s: float = 300) -> ConsumerProcess:
        def ready() -> bool:
            if not self.running():
                raise RuntimeError(
                    f"consumer exited with {self.process and self.process.returncode}:\n{self.tail()}"
                )
            return self.probe(READINESS_PATH) == 200

        wait_until(ready, timeout_s, "the consumer to be ready")
        return self

    def wait_audited(self, timeout_s: float = 300) -> ConsumerProcess:
        """Until the audit a consumer runs at start (CDC_AUDIT_INTERVAL_S) has finished: it reads both
        tables for about CDC_AUDIT_SETTLE_S, which a measurement of the pipeline must not overlap."""

        def audited() -> bool:
            return self.metric_sum(AUDIT_TIMESTAMP) > 0

        if Settings.from_env_map(self.env).audit_interval_s > 0:
            wait_until(audited, timeout_s, "the consumer's start-up audit")
        return self

    def metrics(self) -> Samples:
        return scrape(self.metrics_url)

    def metric_sum(self, name: str, **labels: str) -> float:
        return sum(
            v for (n, ls), v in self.metrics().items() if n == name and labels.items() <= dict(ls).items()
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Signal the process and return its exit code; past the timeout it is killed."""
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
