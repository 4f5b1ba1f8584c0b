"""`cdc-embedder run` with its model wrapped to fail on marked texts: the tests' fault-injection seam.

Texts holding FAIL_ALWAYS never embed (they must end in the dead-letter topic after the last attempt);
texts holding FAIL_TWICE fail on their first two model calls in this process, then embed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import Counter
from collections.abc import Sequence

from consumer.embedders import build_embedder
from consumer.embedders.base import Embedder, Embedding
from consumer.logs import configure_logging
from consumer.service import run_service
from consumer.settings import Settings, load_settings

FAIL_ALWAYS = "[inject: fail always]"
FAIL_TWICE = "[inject: fail twice]"


class FlakyEmbedder:
    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self.name = inner.name
        self.dimension = inner.dimension
        self.dtype = inner.dtype
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Embedding:
        with self._lock:
            for text in texts:
                if FAIL_ALWAYS in text:
                    raise RuntimeError("injected model failure (permanent)")
                if FAIL_TWICE in text:
                    self._calls[text] += 1
                    if self._calls[text] <= 2:
                        raise RuntimeError("injected model failure (transient)")
        return self._inner.embed(texts)


def flaky(settings: Settings) -> Embedder:
    return FlakyEmbedder(build_embedder(settings))  # the default runtime, as `cdc-embedder run` builds it


if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(asyncio.run(run_service(settings, flaky)))
