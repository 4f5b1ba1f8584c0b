"""Where a process's Python threads spend the wall time of a phase, sampled by py-spy from outside.

py-spy (the `bench` extra) reads the consumer's stacks without touching it; it records only samples of
threads that are running, so a category's share of wall time is its samples over duration x rate. Time a
thread spends waiting (on Postgres, on the broker, for the model thread) is in no category: what is left
of the wall time once the model's share is taken is the pipeline's own work plus those waits.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

RATE_HZ = 50
# the first category whose marker a sample's frames contain takes it
CATEGORIES = (
    ("model", ("/torch/", "sentence_transformers", "/transformers/", "/embedders/", "chunking.py")),
    ("database", ("psycopg",)),
    ("kafka", ("aiokafka",)),
    ("decoding", ("consumer/events.py", "json")),
    ("metrics and logs", ("prometheus_client", "structlog", "/logging/")),
)


class PySpy:
    """`py-spy record` of `pid` from start() to stop(), written to `output` in its raw (collapsed) form."""

    def __init__(self, pid: int, output: Path) -> None:
        self.pid, self.output = pid, output
        self._process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self.seconds = 0.0

    def start(self) -> PySpy:
        # installed beside this interpreter when the venv is not on PATH (`.venv/bin/python -m ...`)
        binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if binary is None:  # the bench extra is not installed: the phase goes without a profile
            return self
        self.output.parent.mkdir(parents=True, exist_ok=True)
        argv = [binary, "record", "--pid", str(self.pid), "--rate", str(RATE_HZ), "--threads"]
        argv += ["--format", "raw", "--output", str(self.output), "--nonblocking"]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._started = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling; each category's share of the wall time (empty without py-spy)."""
        if self._process is None:
            return {}
        self.seconds = time.monotonic() - self._started
        self._process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return {}
        if not self.output.exists():
            return {}
        with self.output.open() as lines:
            return shares(lines, self.seconds * RATE_HZ)


def shares(raw: Iterable[str], wall_samples: float) -> dict[str, float]:
    """Samples per category (over all threads) as a share of `wall_samples`, from py-spy's raw lines
    (`thread (tid): name;frame;...;frame count`)."""
    counts: Counter[str] = Counter()
    for line in raw:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        name = next((c for c, markers in CATEGORIES if any(m in stack for m in markers)), "other")
        counts[name] += int(count)
    if wall_samples <= 0:
        return {}
    return {name: counts[name] / wall_samples for name in [c for c, _ in CATEGORIES] + ["other"]}
