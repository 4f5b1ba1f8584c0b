"""The OpenAI-compatible backend (`CDC_EMBEDDER=openai`): OpenAI itself, or a server users host for their
GPUs (Hugging Face TEI, vLLM, Infinity, Ollama), all of which serve `POST <base_url>/embeddings`.

httpx rather than the `openai` package: httpx is already our dependency (Connect's REST API), its sync
client is thread-safe with one connection pool, and it leaves status codes and rate-limit headers to us
instead of retrying behind our back (the `openai` client retries 429s itself and defaults to base64,
which some servers lack). The request and response are plain JSON; we only read `data[].index`,
`data[].embedding` and `usage`.

One call of `embed` cuts the texts into requests within the API's limits (`plan_requests`) and keeps up
to `concurrency` of them in flight, so a remote GPU stays busy. How each failure is classified is in
`consumer.embedders.responses`.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from consumer import metrics
from consumer.embedders.base import Embedding, Vectors
from consumer.embedders.limits import plan_requests, truncate_to_tokens
from consumer.embedders.responses import Rejected, check_response
from consumer.errors import Backpressure, EmbedderConfigError, TransientEmbedError
from consumer.settings import env_name

DEFAULT_BASE_URL = "https://api.openai.com/v1"
PROBE = "dimension probe"  # a text any server embeds: asked when the settings alone are in question
# OpenAI's list prices of its embedding models in USD per million tokens (standard tier, not batch), as
# published when this was written; a price that changed is declared (price_per_million_tokens).
PRICES = {"text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13, "text-embedding-ada-002": 0.10}


class OpenAIEmbedderSpec(BaseModel):
    """One OpenAI-compatible embedder. Defaults are OpenAI's documented limits; a self-hosted server
    usually has lower ones (TEI: `--max-client-batch-size` 32 inputs, `--max-input-length` 512)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["openai"] = "openai"  # the discriminator of a pipeline's embedder (consumer.spec)
    model: str = Field(min_length=1, description="e.g. text-embedding-3-small, or what the server serves")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="the API root; /embeddings is appended")
    dimensions: int | None = Field(
        default=None,
        ge=1,
        description="sent as `dimensions` (text-embedding-3-*, Infinity); unset: probed at start",
    )
    api_key: SecretStr | None = Field(default=None, description="bearer token; never logged")
    api_key_file: Path | None = Field(
        default=None, description="a file holding the key (a mounted Kubernetes Secret), re-read per call"
    )
    concurrency: int = Field(default=4, ge=1, le=64, description="requests in flight at once")
    max_inputs_per_request: int = Field(default=2048, ge=1, le=2048)
    max_tokens_per_request: int = Field(default=300_000, ge=1)
    max_tokens_per_input: int = Field(default=8192, ge=1, description="longer inputs are truncated")
    request_timeout_s: float = Field(default=60.0, gt=0)
    # float: every compatible server has it; base64 is a third of the bytes where the server offers it
    encoding_format: Literal["float", "base64"] = "float"
    price_per_million_tokens: float | None = Field(
        default=None,
        ge=0,
        description="USD per million tokens, for the cost in `backfill --dry-run`; unset: OpenAI's list "
        "price for its own embedding models (PRICES), none for other servers",
    )

    @property
    def identity(self) -> str | None:
        """The identity, where the dimension is declared; else known once the server was asked."""
        return identity(self, self.dimensions) if self.dimensions else None

    def price(self) -> float | None:
        """USD per million tokens: the declared price, or OpenAI's list price for a model of its API."""
        if self.price_per_million_tokens is not None:
            return self.price_per_million_tokens
        return PRICES.get(self.model) if self.base_url.rstrip("/") == DEFAULT_BASE_URL else None

    @property
    def shown_url(self) -> str:
        """The base URL for logs and errors: without the user and password a URL may carry."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))

    def bearer(self) -> str | None:
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return self.api_key.get_secret_value() if self.api_key is not None else None


def identity(spec: OpenAIEmbedderSpec, dimension: int) -> str:
    """`openai:<host>/<model>@<dimension>`: the model column and part of the text hash."""
    parts = urlsplit(spec.base_url)
    return f"openai:{parts.hostname or parts.netloc}{parts.path.rstrip('/')}/{spec.model}@{dimension}"


class OpenAIEmbedder:
    dtype = "remote"

    def __init__(self, spec: OpenAIEmbedderSpec) -> None:
        self._spec = spec
        self._client = httpx.Client(
            base_url=spec.base_url,
            timeout=spec.request_timeout_s,
            limits=httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency),
        )
        # I/O threads: each request blocks on the socket, not on the GIL
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix="openai")
        self._in_flight = 0
        self._lock = threading.Lock()
        self.dimension = spec.dimensions or self._probe_dimension()
        self.name = identity(spec, self.dimension)

    def _probe_dimension(self) -> int:
        vectors = self._request([PROBE], expect=None)
        if isinstance(vectors, Rejected):
            raise EmbedderConfigError(
                f"the server refuses a probe text ({vectors.reason})",
                f"check {env_name('openai_model')} and {env_name('openai_base_url')}",
            )
        return int(vectors[0].shape[1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def embed(self, texts: Sequence[str]) -> Embedding:
        limit = self._spec.max_tokens_per_input
        inputs = [truncate_to_tokens(t, limit) for t in texts]
        truncated = sum(len(a) < len(b) for a, b in zip(inputs, texts, strict=True))
        vectors = np.zeros((len(inputs), self.dimension), dtype=np.float32)
        rejected: dict[int, str] = {}
        tokens = 0
        spec = self._spec
        requests = plan_requests(inputs, spec.max_inputs_per_request, spec.max_tokens_per_request)
        while requests:
            again: list[list[int]] = []
            for indices, result in zip(requests, self._send_all(inputs, requests), strict=True):
                if isinstance(result, Rejected):
                    if len(indices) == 1:
                        rejected[indices[0]] = result.reason
                    else:  # a 400 for several inputs does not say which: ask for each on its own
                        again += [[i] for i in indices]
                    continue
                vectors[indices], billed = result
                tokens += billed
            requests = again
        return Embedding(vectors, tokens, truncated, rejected)

    def _send_all(self, inputs: list[str], requests: list[list[int]]) -> list[tuple[Vectors, int] | Rejected]:
        """The requests, `concurrency` at a time. On the first failure the requests not yet sent are
        cancelled and the most telling failure raised: an operator error over a rate limit over the rest
        (the caller sends the whole batch again, so the others' vectors would be paid for twice anyway)."""
        futures = [self._pool.submit(self._request, [inputs[i] for i in r], self.dimension) for r in requests]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        wait(pending)
        errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
        if errors:
            raise max(errors, key=_severity)
        return [f.result() for f in futures]

    def _request(self, inputs: list[str], expect: int | None) -> tuple[Vectors, int] | Rejected:
        body: dict[str, Any] = {
            "model": self._spec.model,
            "input": inputs,
            "encoding_format": self._spec.encoding_format,
        }
        if self._spec.dimensions:
            body["dimensions"] = self._spec.dimensions
        key = self._spec.bearer()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._track(+1)
        started = time.perf_counter()
        try:
            response = self._client.post("embeddings", json=body, headers=headers)
        except httpx.TransportError as exc:  # timeouts, refused or reset connections
            metrics.EMBED_REQUESTS.labels(status="error").inc()
            raise TransientEmbedError(
                f"{type(exc).__name__} from {self._spec.shown_url}: {exc}",
                unreachable=isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout),
            ) from exc
        finally:
            self._track(-1)
            metrics.EMBED_REQUEST_SECONDS.observe(time.perf_counter() - started)
        metrics.EMBED_REQUESTS.labels(status=str(response.status_code)).inc()
        try:
            payload = check_response(response, self._spec)
        except EmbedderConfigError as exc:
            # A 400 or 422 that names the model or the dimensions may only echo an input that does (a
            # validation error quoting it): if the probe text embeds with the same settings, the inputs
            # are at fault, not the configuration, and must not hold the stream.
            if response.status_code in (400, 422) and inputs != [PROBE] and self._probe_embeds():
                return Rejected(str(exc))
            raise
        if isinstance(payload, Rejected):
            return payload
        return _decode(payload, len(inputs), expect, self._spec)

    def _probe_embeds(self) -> bool:
        try:
            return not isinstance(self._request([PROBE], expect=None), Rejected)
        except (EmbedderConfigError, TransientEmbedError, Backpressure):
            return False

    def _track(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            metrics.EMBED_IN_FLIGHT.set(self._in_flight)


def _decode(
    payload: dict[str, Any], n: int, expect: int | None, spec: OpenAIEmbedderSpec
) -> tuple[Vectors, int]:
    """The response's vectors in input order, L2-normalised, and the tokens it billed."""
    data = sorted(payload.get("data") or [], key=lambda item: item["index"])
    if len(data) != n:
        raise TransientEmbedError(f"the server answered {len(data)} embeddings for {n} inputs")
    rows = [_vector(item["embedding"]) for item in data]
    dimension = rows[0].shape[0]
    if expect is not None and any(r.shape[0] != expect for r in rows):
        raise EmbedderConfigError(
            f"the server returns vectors of {dimension} dimensions, not {expect}",
            f"set {env_name('openai_dimensions')} to what {spec.model} produces (or unset it)",
        )
    matrix: Vectors = np.vstack(rows)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # cosine search wants unit vectors; OpenAI's are, a self-hosted model's may not be
    unit: Vectors = (matrix / np.where(norms == 0, 1, norms)).astype(np.float32)
    usage = payload.get("usage") or {}
    billed = int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
    metrics.TOKENS_BILLED.inc(billed)
    return unit, billed


def _vector(raw: Any) -> Vectors:
    if isinstance(raw, str):  # encoding_format=base64: little-endian float32
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


def _severity(exc: BaseException) -> tuple[int, float]:
    if isinstance(exc, EmbedderConfigError):
        return (3, 0.0)
    if isinstance(exc, Backpressure):
        return (2, exc.retry_after_s)
    return (1, 0.0)
