"""The operations HTTP endpoint: /metrics and the three Kubernetes probes.

It runs in its own thread rather than on the event loop, so that liveness can *report* a stalled loop
(by the age of the loop's last heartbeat) instead of merely timing out, and so that a scrape never
competes with the consumer for the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer import metrics

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"
STARTUP_PATH = "/startupz"
HEARTBEAT_INTERVAL_S = 1.0


class HealthState:
    """What the probes report. Written from the event loop, read from the HTTP thread."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._last_tick = clock()
        self.started = False  # the model is loaded and the schema checked
        self.partitions_assigned = False
        self.database_ok = False
        # what an operator must fix (a grant, a setting, a table) while the consumer holds its batch
        self.operator_error: str | None = None
        self.model_stalled = False

    def model_stall(self) -> None:
        """A model call outlived CDC_MODEL_TIMEOUT_S: its thread cannot be stopped, so only a restart
        frees the model for the next batch."""
        self.model_stalled = True
        metrics.MODEL_TIMEOUTS.inc()

    def tick(self) -> None:
        self._last_tick = self._clock()
        metrics.LOOP_HEARTBEAT_TIMESTAMP.set_to_current_time()

    def loop_stalled_for(self) -> float:
        return self._clock() - self._last_tick

    def live(self) -> tuple[bool, str]:
        stalled = self.loop_stalled_for()
        if stalled > self._stall_after_s:
            return False, f"event loop made no progress for {stalled:.1f}s"
        if self.model_stalled:
            return False, "a model call outlived CDC_MODEL_TIMEOUT_S and still holds the model thread"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        if self.operator_error is not None:
            return False, f"operator error: {self.operator_error}"
        if not self.database_ok:
            return False, "database unavailable"
        if not self.partitions_assigned:
            return False, "no partitions assigned"
        return True, "ok"

    def startup(self) -> tuple[bool, str]:
        return (True, "ok") if self.started else (False, "loading model")


async def heartbeat(state: HealthState) -> None:
    """Ticks while the event loop runs; a blocked loop stops it and liveness fails."""
    while True:
        state.tick()
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


def _handler(state: HealthState) -> type[BaseHTTPRequestHandler]:
    probes: dict[str, Callable[[], tuple[bool, str]]] = {
        LIVENESS_PATH: state.live,
        READINESS_PATH: state.ready,
        STARTUP_PATH: state.startup,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS_PATH:
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path in probes:
                ok, reason = probes[path]()
                self._send(200 if ok else 503, reason.encode() + b"\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds would drown the JSON log."""

    return Handler


def serve(state: HealthState, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; port 0 picks a free one (see ``server_address``)."""
    server = ThreadingHTTPServer((host, port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
