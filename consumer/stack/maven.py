"""Resolve the JVM side of the local stack (Kafka broker, Connect worker, Debezium plugin) from Maven Central.

No Kafka distribution is packaged for pip, apt or npm, but Maven Central serves every jar, so each service
has a small pom under deploy/local/ and `mvn dependency:copy-dependencies` lays its classpath out under
<stack_dir>/jars/. Maven's own ~/.m2 cache makes a second clone cheap; the marker file makes a second
`stack up` in the same clone free.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from consumer.stack.process import Progress, StackError, appending_log, log_tail, require_tool, silent

MARKER = ".resolved"
# The Debezium jars sit one level down: Connect's plugin.path lists folders *of* plugin folders.
DEBEZIUM_PLUGIN_SUBDIR = "debezium-connector-postgres"


def default_pom_root() -> Path:
    """deploy/local in the source tree this package was loaded from."""
    return Path(__file__).resolve().parents[2] / "deploy" / "local"


@dataclass(frozen=True)
class JarDirs:
    kafka: Path
    connect: Path
    debezium_plugin_path: Path

    @property
    def debezium(self) -> Path:
        return self.debezium_plugin_path / DEBEZIUM_PLUGIN_SUBDIR

    def all_resolved(self) -> bool:
        return all(_resolved(d) for d in (self.kafka, self.connect, self.debezium))


def jar_dirs(stack_dir: Path) -> JarDirs:
    root = stack_dir / "jars"
    return JarDirs(
        kafka=root / "kafka", connect=root / "connect", debezium_plugin_path=root / "debezium-plugin"
    )


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def _resolved(target: Path, pom: Path | None = None) -> bool:
    marker = target / MARKER
    if not marker.is_file() or not any(target.glob("*.jar")):
        return False
    # A changed pom (a version bump) must not keep running on the jars of the old one.
    return pom is None or marker.read_text().strip() == _pom_digest(pom)


def _copy_dependencies(pom: Path, target: Path, log_file: Path, timeout_s: float) -> None:
    mvn = require_tool("mvn", "install Apache Maven 3.8+ (Debian: apt-get install maven) or put it on PATH")
    # Resolve into a sibling folder and swap it in, so an interrupted run never leaves a half classpath
    # that looks complete, and an old version's jars never mix with a new one's.
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    argv = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"]
    with appending_log(log_file, " ".join(argv)) as log:
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Maven did not finish {pom} within {timeout_s:.0f} s; see {log_file}") from exc
    if result.returncode != 0 or not any(staging.glob("*.jar")):
        raise StackError(
            f"Maven could not resolve {pom} (exit {result.returncode}); Maven Central must be reachable "
            f"for the first `stack up`. Last lines of {log_file}:\n{log_tail(log_file, 20)}"
        )
    (staging / MARKER).write_text(_pom_digest(pom) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)


def resolve_jars(
    stack_dir: Path,
    *,
    pom_root: Path | None = None,
    progress: Progress = silent,
    timeout_s: float = 900.0,
) -> JarDirs:
    """Make sure every service's jars are under <stack_dir>/jars; download only what is missing."""
    pom_root = pom_root or default_pom_root()
    dirs = jar_dirs(stack_dir)
    log_file = stack_dir / "logs" / "maven.log"
    plan = [
        ("Kafka broker", pom_root / "kafka" / "pom.xml", dirs.kafka),
        ("Kafka Connect", pom_root / "connect" / "pom.xml", dirs.connect),
        ("Debezium Postgres connector", pom_root / "debezium" / "pom.xml", dirs.debezium),
    ]
    for label, pom, target in plan:
        if not pom.is_file():
            raise StackError(f"{pom} is missing: run the stack from a checkout of cdc-embedder")
        if _resolved(target, pom):
            progress(f"jars: {label} already in {target}")
            continue
        progress(f"jars: resolving {label} with Maven (log: {log_file}) ...")
        started = time.monotonic()
        # Sequential on purpose: Maven 3.8 does not lock ~/.m2, so parallel runs can corrupt downloads.
        _copy_dependencies(pom, target, log_file, timeout_s)
        count = sum(1 for _ in target.glob("*.jar"))
        progress(f"jars: {label}: {count} jars in {time.monotonic() - started:.1f} s")
    return dirs
