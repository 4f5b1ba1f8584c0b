"""What the bench ran on, and how much memory a process holds."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": list(os.getloadavg()),
    }


# Libraries of a CUDA build of torch (PyPI's default on Linux) that the image's CPU-only torch has not:
# their resident pages are part of a consumer's RSS here and not in the image.
CUDA_LIBRARY_MARKERS = ("/nvidia/", "libtorch_cuda", "libc10_cuda", "/triton/", "libcu", "libnv")


def cuda_library_bytes(pid: int) -> int:
    """Resident bytes of a process's mappings of CUDA libraries, from /proc/<pid>/smaps; 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            return cuda_rss_of(smaps)
    except (OSError, ValueError):
        return 0


def cuda_rss_of(smaps: Iterable[str]) -> int:
    total, counting = 0, False
    for line in smaps:
        head = line.split(maxsplit=5)
        if head and not head[0].endswith(":"):  # a mapping's first line; its path is the 6th field
            counting = len(head) > 5 and any(m in head[5] for m in CUDA_LIBRARY_MARKERS)
        elif counting and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, from /proc/<pid>/status; zeros once it is gone."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    current = fields.get("VmRSS", 0)
    return current, max(fields.get("VmHWM", 0), current)


class RssSampler:
    """Samples a process's RSS every `every_s` seconds on a daemon thread: [(t, rss), ...] and the peak."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self.peak = 0
        self.cuda_library_bytes = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        current, peak = rss_bytes(self.pid)
        if current:
            self.samples.append((time.monotonic() - self._started, current))
            self.peak = max(self.peak, peak, current)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        self.cuda_library_bytes = cuda_library_bytes(self.pid)
