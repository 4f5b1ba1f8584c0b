"""deploy/docker/Dockerfile and .dockerignore, read as text (no Docker engine here), and the image's
HEALTHCHECK command run for real against consumer.health's HTTP server.

What this cannot check offline: that the build itself succeeds (it downloads torch's CPU wheel and the
model), nor that the base image tag exists in its registry.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consumer import health
from consumer.cli import build_parser
from consumer.settings import DEFAULT_MODEL, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SETTINGS_ENV = {f"CDC_{name.upper()}" for name in Settings.model_fields}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                result[key] = value
        return result


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue  # comments (also inside a continuation) and blank lines within one are dropped
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            key, _, value = args.partition("=")
            global_args[key] = value
        elif keyword == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def _runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def _healthcheck_command(stages: list[Stage]) -> list[str]:
    (healthcheck,) = _runtime(stages).all("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options
    argv: list[str] = json.loads(command)
    return argv


def test_parser_sees_the_stages(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == ["build", "model", "runtime"]


def test_base_images_are_pinned_slim_bookworm(stages: list[Stage]) -> None:
    names = {s.name for s in stages}
    external = [s.base for s in stages if s.base not in names]
    assert external and all(base == "python:3.11-slim-bookworm" for base in external), external
    assert _runtime(stages).base == "python:3.11-slim-bookworm"


def test_torch_is_the_cpu_build(stages: list[Stage]) -> None:
    build = stages[0]
    text = " ".join(build.all("ARG") + build.all("RUN"))
    assert "download.pytorch.org/whl/cpu" in text
    torch_run = next(r for r in build.all("RUN") if '"torch==' in r)
    assert "--index-url" in torch_run
    assert re.search(r"TORCH_VERSION=\d+\.\d+\.\d+", " ".join(build.all("ARG")))


def test_runs_as_non_root(stages: list[Stage]) -> None:
    (user,) = _runtime(stages).all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric non-root uid, so runAsNonRoot can verify it"


def test_model_is_baked_and_loaded_offline(stages: list[Stage]) -> None:
    model = next(s for s in stages if s.name == "model")
    args = dict(a.split("=", 1) for a in model.all("ARG"))
    assert args["MODEL_ID"] == DEFAULT_MODEL
    saved = re.findall(r"\.save\('([^']+)'\)", " ".join(model.all("RUN")))
    assert len(saved) == 1
    runtime = _runtime(stages)
    copies = [c for c in runtime.all("COPY") if c.startswith("--from=model ")]
    env = runtime.env()
    exported = env["CDC_OPENVINO_CACHE_DIR"]
    assert copies == [f"--from=model {saved[0]} {saved[0]}", f"--from=model {exported} {exported}"]
    # the export is made from the saved model, into the folder the runtime reads
    export = next(r for r in model.all("RUN") if "openvino-export" in r)
    assert f"CDC_MODEL={saved[0]} CDC_OPENVINO_CACHE_DIR={exported} cdc-embedder openvino-export" in export
    assert env["CDC_MODEL"] == saved[0]
    assert env["HF_HUB_OFFLINE"] == "1"


def test_env_sets_only_existing_settings(stages: list[Stage]) -> None:
    env = {k: v for stage in stages for k, v in stage.env().items() if k.startswith("CDC_")}
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert int(env["CDC_HTTP_PORT"]) == Settings().http_port


def test_port_and_entrypoint(stages: list[Stage]) -> None:
    runtime = _runtime(stages)
    assert runtime.all("EXPOSE") == [str(Settings().http_port)]
    assert [json.loads(e) for e in runtime.all("ENTRYPOINT")] == [["cdc-embedder"]]
    assert [json.loads(c) for c in runtime.all("CMD")] == [["run"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cdc-embedder"] == "consumer.cli:main"
    assert build_parser().parse_args(["run"]).command == "run"


def test_healthcheck_hits_liveness_on_the_settings_port(stages: list[Stage]) -> None:
    argv = _healthcheck_command(stages)
    assert argv[:2] == ["python", "-c"]
    urls = re.findall(r"http://[^'\"]+", argv[2])
    assert urls == [f"http://127.0.0.1:{Settings().http_port}{health.LIVENESS_PATH}"]


def _run_healthcheck(argv: list[str], port: int) -> int:
    script = argv[2].replace(f":{Settings().http_port}/", f":{port}/")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode


def test_healthcheck_command_against_the_real_endpoint(stages: list[Stage]) -> None:
    """The exact one-liner passes on a live loop and fails on a stalled one (port swapped for a free one)."""
    now = [0.0]
    state = health.HealthState(stall_after_s=30.0, clock=lambda: now[0])
    server = health.serve(state, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        argv = _healthcheck_command(stages)
        assert _run_healthcheck(argv, port) == 0
        now[0] = 31.0  # no heartbeat for longer than the stall limit
        assert _run_healthcheck(argv, port) != 0
    finally:
        server.shutdown()
        server.server_close()


# --- .dockerignore -------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything below it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matcher_works() -> None:
    assert _ignored("a/b.py", ["*"]) and not _ignored("a/b.py", ["*", "!a/"])
    assert _ignored("a/b/__pycache__/x.pyc", ["*", "!a/", "**/__pycache__"])
    assert not _ignored("a/b/c.py", ["*", "!a/", "**/__pycache__"])


def test_dockerignore_keeps_what_the_build_copies(stages: list[Stage], ignore_patterns: list[str]) -> None:
    sources = []
    for stage in stages:
        for copy in stage.all("COPY"):
            if not copy.startswith("--from="):
                sources += copy.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository (the build would fail)"
        assert not _ignored(source, ignore_patterns), f".dockerignore drops {source}, which the build copies"
    assert not _ignored("consumer/settings.py", ignore_patterns)


LOCAL_STATE = [
    ".venv/bin/python",
    ".git/HEAD",
    ".stack/pg/PG_VERSION",
    "tests/unit/x.py",
    "deploy/local/x/target/a.jar",
    "consumer/__pycache__/cli.cpython-311.pyc",
    "bench-results/run.json",
]


@pytest.mark.parametrize("path", LOCAL_STATE)
def test_dockerignore_keeps_out_local_state(path: str, ignore_patterns: list[str]) -> None:
    assert _ignored(path, ignore_patterns)
