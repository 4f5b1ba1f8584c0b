"""The model calls of one batch: rate limits and transient failures waited out in place, a stalled model
caught by the CDC_MODEL_TIMEOUT_S watchdog, a failure of unknown kind narrowed text by text, and what
was embedded counted. Apart from `consumer.pipeline`, which decides what to embed and writes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from consumer import metrics
from consumer.embedders.base import Chunk, Embedder, Embedding, Vector
from consumer.errors import (
    Backpressure,
    EmbedderConfigError,
    ErrorClass,
    TransientEmbedError,
    classify,
    describe,
)
from consumer.logs import get_logger
from consumer.standstill import backoff

log = get_logger("cdc_embedder.pipeline")
# Rate limiting waited out inside one batch, at most; well below aiokafka's max.poll.interval.ms (300 s).
BACKPRESSURE_IN_PLACE_S = 60.0
TRANSIENT_ATTEMPTS = 3  # calls of a failing embedding server per batch before its texts are retried

# a text's vector and, in a chunked pipeline, its chunks
Embedded = tuple[Vector, tuple[Chunk, ...]]


class Accounting(Protocol):
    """The part of a batch's report that its model calls fill in (`consumer.pipeline.BatchReport`)."""

    pipeline: str
    embedded_texts: int
    model_s: float


@dataclass(slots=True)
class _Tally:
    """The accounting of work embedded ahead, which no batch report holds yet."""

    pipeline: str
    embedded_texts: int = 0
    model_s: float = 0.0


class ModelCalls:
    def __init__(
        self,
        embedder: Embedder,
        executor: Executor | None,
        timeout_s: float,
        backoff_max_s: float,
        on_model_stall: Callable[[], None],
    ) -> None:
        self._embedder, self._executor = embedder, executor
        self._timeout_s, self._backoff_max_s = timeout_s, backoff_max_s
        self._on_model_stall = on_model_stall
        self._ahead: dict[bytes, Embedded] = {}  # by text hash: what `embed_ahead` embedded last
        self._ahead_s_each = 0.0  # its model time per text

    async def embed_ahead(self, texts: list[str], digests: list[bytes], pipeline: str) -> None:
        """Embed the next batch's texts (`digests`: their `text_hash`es) for `embed_all` to find.

        One attempt, any failure ignored: the batch embeds what is missing itself, with the handling
        of failures below. What was embedded ahead before is forgotten, so this holds one batch's
        vectors at most; the model's work is counted now, as it was done.
        """
        if self._ahead:  # the batch took the vectors it needed; these it did not
            metrics.TEXTS_AHEAD_UNUSED.labels(pipeline=pipeline).inc(len(self._ahead))
            self._ahead.clear()
        texts, digests = _distinct(texts, digests)
        if not texts:
            return
        started = time.perf_counter()
        try:
            embedding = await self._run_model(texts)
        except Exception as exc:
            log.debug("embedding ahead failed; the batch embeds its texts itself", cause=describe(exc))
            return
        self._account(embedding, _Tally(pipeline))
        chunks = embedding.chunks or [()] * len(embedding.vectors)
        for index, (digest, vector, pieces) in enumerate(
            zip(digests, embedding.vectors, chunks, strict=True)
        ):
            if index not in embedding.rejected:
                self._ahead[digest] = (vector, pieces)
        self._ahead_s_each = (time.perf_counter() - started) / len(texts)

    async def embed_all(
        self, texts: list[str], report: Accounting, digests: list[bytes]
    ) -> tuple[list[Embedded | None], dict[int, tuple[ErrorClass, str]]]:
        """Embed the batch; returns a vector (and its chunks) or an error (class, reason) per text.

        A text the batch holds more than once (rows of one text: a template, a placeholder) is embedded
        once, every copy given its result. Texts whose hash (`digests`) `embed_ahead` embedded take that
        vector and its share of the model time; the others are embedded here.
        """
        distinct, distinct_digests = _distinct(texts, digests)
        slot = {digest: index for index, digest in enumerate(distinct_digests)}
        results, errors = await self._embed_distinct(distinct, report, distinct_digests)
        slots = [slot[digest] for digest in digests]
        return [results[s] for s in slots], {p: errors[s] for p, s in enumerate(slots) if s in errors}

    async def _embed_distinct(
        self, texts: list[str], report: Accounting, digests: list[bytes]
    ) -> tuple[list[Embedded | None], dict[int, tuple[ErrorClass, str]]]:
        ahead = [self._ahead.pop(d, None) for d in digests]
        missing = [i for i, found in enumerate(ahead) if found is None]
        found = len(texts) - len(missing)
        report.embedded_texts += found
        report.model_s += found * self._ahead_s_each
        if not found:
            return await self._embed(texts, report)
        results: list[Embedded | None] = list(ahead)
        embedded, errors = await self._embed([texts[i] for i in missing], report) if missing else ([], {})
        for index, result in zip(missing, embedded, strict=True):
            results[index] = result
        return results, {missing[i]: error for i, error in errors.items()}

    async def _embed(
        self, texts: list[str], report: Accounting
    ) -> tuple[list[Embedded | None], dict[int, tuple[ErrorClass, str]]]:
        """Embed `texts`; returns a vector (and its chunks) or an error (class, reason) per text.

        What a failure means comes from its type (consumer.errors), and only a failure of unknown kind
        (a local model's exception) makes the batch go text by text so that only the failing ones are
        retried: rate limits and transient errors of a server concern the request, not a text.
        - Rejected inputs (the server's 400 for that input alone): only those are dead-lettered, with
          the server's reason.
        - `Backpressure` and `TransientEmbedError`: waited out in place, then the same texts are sent
          again (`_embed_patiently`); a server that keeps failing sends the texts to the retry topic,
          but one that cannot be reached at all (`unreachable`) holds the batch like a database outage.
        - `EmbedderConfigError` (key, model, dimension): raised; the batch is held uncommitted, not
          ready, with the setting to fix logged, and nothing is dead-lettered.
        - A model call past CDC_MODEL_TIMEOUT_S fails the whole batch at once: its thread cannot be
          stopped, so calling it again text by text would only queue behind it.

        None of this holds a Kafka transaction open: the batch's transaction is begun by the producer
        on the client only, and the broker starts its timeout (transaction.timeout.ms) at the first
        partition or offsets added to it, which `route` and the offsets commit do after the vectors
        are written. A wait here only delays that start.
        """
        started = time.perf_counter()
        results: list[Embedded | None] = []
        errors: dict[int, tuple[ErrorClass, str]] = {}
        try:
            embedding = await self._embed_patiently(texts, report)
            results = self._accepted(embedding, 0, errors, report)
        except TimeoutError as exc:
            results = [None] * len(texts)
            errors = dict.fromkeys(range(len(texts)), (ErrorClass.TIMEOUT, str(exc)))
        except TransientEmbedError as exc:
            if exc.unreachable:
                raise
            results = [None] * len(texts)
            errors = dict.fromkeys(range(len(texts)), (classify(exc), describe(exc)))
        except (Backpressure, EmbedderConfigError):
            raise
        except Exception:
            for index, text in enumerate(texts):
                try:
                    single = await self._run_model([text])
                except (Backpressure, EmbedderConfigError):
                    raise
                except TransientEmbedError as exc:
                    if exc.unreachable:
                        raise
                    results.append(None)
                    errors[index] = (classify(exc), describe(exc))
                    continue
                except Exception as exc:
                    results.append(None)
                    errors[index] = (classify(exc), f"{type(exc).__name__}: {exc}")
                    continue
                results += self._accepted(single, index, errors, report)
        report.model_s += time.perf_counter() - started
        return results, errors

    def _accepted(
        self, embedding: Embedding, first: int, errors: dict[int, tuple[ErrorClass, str]], report: Accounting
    ) -> list[Embedded | None]:
        """The vectors (and chunks) of texts `first`, `first` + 1, ...; None (and the server's reason in
        `errors`) for an input the server refused, whose row of zeros must never be written."""
        self._account(embedding, report)
        chunks = embedding.chunks or [()] * len(embedding.vectors)
        results: list[Embedded | None] = list(zip(embedding.vectors, chunks, strict=True))
        for index, reason in embedding.rejected.items():
            results[index] = None
            errors[first + index] = (ErrorClass.MODEL_REJECTED, reason)
        return results

    async def _embed_patiently(self, texts: list[str], report: Accounting) -> Embedding:
        """The model call, repeated for the same texts while the server rate-limits us (its retry-after)
        or fails transiently (backoff, TRANSIENT_ATTEMPTS in all).

        The waits are on the event loop, outside the model watchdog (a wait is not a stall). Past
        BACKPRESSURE_IN_PLACE_S of rate limiting in one batch the `Backpressure` is raised: the consumer
        then pauses every partition, keeps its group membership (a batch held longer would outlive
        max.poll.interval.ms) and applies the batch again later.
        """
        waited = 0.0
        delay = 0.0
        failures = 0
        while True:
            try:
                return await self._run_model(texts)
            except Backpressure as exc:
                if waited + exc.retry_after_s > BACKPRESSURE_IN_PLACE_S:
                    raise
                log.info("rate limited by the embedding server; waiting", wait_s=exc.retry_after_s)
                metrics.BACKPRESSURE_SECONDS.inc(exc.retry_after_s)
                waited += exc.retry_after_s
                await asyncio.sleep(exc.retry_after_s)
            except TransientEmbedError as exc:
                failures += 1
                if failures >= TRANSIENT_ATTEMPTS:
                    raise
                delay = backoff(delay, self._backoff_max_s)
                log.warning("embedding server failed; retrying", cause=describe(exc), wait_s=delay)
                await asyncio.sleep(delay)

    async def _run_model(self, texts: list[str]) -> Embedding:
        loop = asyncio.get_running_loop()
        timeout = self._timeout_s
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._embedder.embed, texts), timeout
            )
        except TimeoutError:
            self._on_model_stall()
            raise TimeoutError(
                f"the model took over {timeout:g} s for {len(texts)} texts (CDC_MODEL_TIMEOUT_S)"
            ) from None

    @staticmethod
    def _account(embedding: Embedding, report: Accounting) -> None:
        embedded = len(embedding.vectors) - len(embedding.rejected)
        report.embedded_texts += embedded
        metrics.TEXTS_EMBEDDED.labels(pipeline=report.pipeline).inc(embedded)
        metrics.TOKENS_EMBEDDED.labels(pipeline=report.pipeline).inc(embedding.tokens)
        metrics.TEXTS_TRUNCATED.labels(pipeline=report.pipeline).inc(embedding.truncated)
        for chunks in embedding.chunks or ():
            if chunks:
                metrics.CHUNKS_PER_DOCUMENT.labels(pipeline=report.pipeline).observe(len(chunks))
                if len(chunks) > 1:
                    metrics.CHUNKED_DOCUMENTS.labels(pipeline=report.pipeline).inc()


def _distinct(texts: list[str], digests: list[bytes]) -> tuple[list[str], list[bytes]]:
    """Each text once (by its hash), in the order of its first copy."""
    first: dict[bytes, str] = {}
    for text, digest in zip(texts, digests, strict=True):
        first.setdefault(digest, text)
    return list(first.values()), list(first)
