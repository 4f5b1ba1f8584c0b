"""A small HTTP proxy in front of the embedding server that answers some requests with the status codes
a real API sends (429 with Retry-After, 500, 400 for one input), for the fault tests. Connection faults
(resets, latency) come from toxiproxy instead (`Toxiproxy`), which works on TCP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from consumer.consumer_process import free_port, wait_until

REFUSE = "[inject: refused by the server]"  # an input holding this gets a 400 for itself


@dataclass
class StatusProxy:
    upstream: str
    rate_limit_first: int = 0  # the first N requests get 429 with Retry-After: 1
    fail_first: int = 0  # then N requests get 500
    seen: Counter[int] = field(default_factory=Counter)  # statuses answered

    def start(self) -> StatusProxy:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()

    def _verdict(self, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        with self._lock:
            if self.rate_limit_first > 0:
                self.rate_limit_first -= 1
                return 429, {"Retry-After": "1"}, b'{"error": {"message": "Rate limit reached"}}'
            if self.fail_first > 0:
                self.fail_first -= 1
                return 500, {}, b'{"error": {"message": "injected server error"}}'
        if any(REFUSE in text for text in json.loads(body).get("input", [])):
            return 400, {}, b'{"error": {"message": "injected: this input is refused"}}'
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                verdict = proxy._verdict(body)
                if verdict is None:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() in ("authorization", "content-type")
                    }
                    answer = httpx.post(proxy.upstream + self.path, content=body, headers=headers, timeout=60)
                    verdict = answer.status_code, {}, answer.content
                status, headers, content = verdict
                with proxy._lock:
                    proxy.seen[status] += 1
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the test counts statuses instead."""

        return Handler


def toxiproxy_binary() -> str:
    """`make setup` installs it beside our Python (go install ...toxiproxy/v2/cmd/server)."""
    beside = Path(sys.executable).parent / "toxiproxy-server"
    found = str(beside) if beside.exists() else shutil.which("toxiproxy-server")
    assert found, "toxiproxy-server is missing: run `make setup`"
    return found


@dataclass
class Toxiproxy:
    """toxiproxy's server with one proxy to `upstream` (host:port); toxics are added through its API."""

    upstream: str
    api_port: int = field(default_factory=free_port)
    listen_port: int = field(default_factory=free_port)

    def start(self, log_file: Path) -> Toxiproxy:
        with log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [toxiproxy_binary(), "-host", "127.0.0.1", "-port", str(self.api_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._up, 30, "toxiproxy's API")
        proxy = {"name": "embed", "listen": f"127.0.0.1:{self.listen_port}", "upstream": self.upstream}
        httpx.post(f"{self._api}/proxies", json=proxy).raise_for_status()
        return self

    @property
    def _api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self._api}/version").status_code == 200
        except httpx.HTTPError:
            return False

    def toxic(self, name: str, kind: str, toxicity: float = 1.0, **attributes: int) -> None:
        toxic = {"name": name, "type": kind, "toxicity": toxicity, "attributes": attributes}
        httpx.post(f"{self._api}/proxies/embed/toxics", json=toxic).raise_for_status()

    def clear(self, name: str) -> None:
        httpx.delete(f"{self._api}/proxies/embed/toxics/{name}").raise_for_status()

    def enable(self, enabled: bool) -> None:
        """A disabled proxy closes its port: connections are refused, as to a server that is down."""
        httpx.post(f"{self._api}/proxies/embed", json={"enabled": enabled}).raise_for_status()

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
