"""Register, inspect and delete the Debezium connector through Kafka Connect's REST API.

This is exactly what a user does against their own Connect cluster: PUT the config from
connectors/documents.json. The database fields in that file are `${env:CDC_PG_*}` placeholders that the
worker resolves with its env config provider, so no password travels in the payload or reaches a log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import httpx

from consumer.errors import OperatorError
from consumer.settings import Settings, env_name
from consumer.spec import load_pipelines

CONNECTOR_FILE = Path("connectors") / "documents.json"


class ConnectorError(OperatorError):
    """The connector could not be registered or inspected; the message says what to change."""


class ConnectorSpec(TypedDict):
    name: str
    config: dict[str, str]


def _silent(_: str) -> None:
    pass


def default_connector_path() -> Path:
    """connectors/documents.json of the source tree, else of the current folder."""
    candidates = [Path(__file__).resolve().parents[1] / CONNECTOR_FILE, Path.cwd() / CONNECTOR_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConnectorError(
        f"{CONNECTOR_FILE} not found (looked in {', '.join(map(str, candidates))}); pass its path"
    )


def load_connector_file(path: Path | str | None = None) -> ConnectorSpec:
    path = Path(path) if path is not None else default_connector_path()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConnectorError(f"cannot read the connector config {path}: {exc}") from exc
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("name"), str)
        or not isinstance(raw.get("config"), dict)
    ):
        raise ConnectorError(f'{path} must look like {{"name": "...", "config": {{...}}}}')
    # Connect stores every value as a string; normalising here keeps numbers and booleans from tripping it.
    config = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw["config"].items()}
    return ConnectorSpec(name=raw["name"], config=config)


def connector_config(
    settings: Settings, path: Path | str | None = None, tables: tuple[str, ...] = ()
) -> ConnectorSpec:
    """The connector as it is sent: the file, with the tables, topic prefix and partitions from settings.

    It captures the source table of every pipeline (CDC_PIPELINES_FILE, or the one of the CDC_*
    variables) and `tables` besides; each must be in the publication.
    """
    spec = load_connector_file(path)
    config = dict(spec["config"])
    sources = [p.source_table for p in load_pipelines(settings)]
    config["table.include.list"] = ",".join(dict.fromkeys((*sources, *tables)))
    config["topic.prefix"] = settings.topic_prefix
    config["topic.creation.default.partitions"] = str(settings.stack_topic_partitions)
    return ConnectorSpec(name=spec["name"], config=config)


def publication_name(settings: Settings, path: Path | str | None = None) -> str:
    """The Postgres publication the connector reads; created with the source table, not by Debezium."""
    return connector_config(settings, path)["config"]["publication.name"]


def signal_table_name(settings: Settings, path: Path | str | None = None) -> str:
    """Debezium's signal table (schema.table), through which snapshots are asked for."""
    return connector_config(settings, path)["config"]["signal.data.collection"]


def _base_url(settings: Settings, base_url: str | None) -> str:
    return (base_url or settings.connect_rest_url).rstrip("/")


def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return httpx.request(method, url, timeout=30.0, **kwargs)
    except httpx.TransportError as exc:
        root = url.split("/connectors")[0]
        raise ConnectorError(
            f"Kafka Connect not reachable at {root}: set {env_name('connect_url')} "
            f"(or start the local one with `cdc-embedder stack up`) ({exc})"
        ) from exc


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:2000]
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)


def connector_status(
    settings: Settings,
    name: str | None = None,
    *,
    path: Path | str | None = None,
    base_url: str | None = None,
) -> dict[str, Any] | None:
    """GET /connectors/{name}/status; None when the connector does not exist."""
    name = name or load_connector_file(path)["name"]
    response = _call("GET", f"{_base_url(settings, base_url)}/connectors/{name}/status")
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise ConnectorError(
            f"status of connector {name}: HTTP {response.status_code}: {_error_text(response)}"
        )
    result: dict[str, Any] = response.json()
    return result


def delete_connector(
    settings: Settings,
    name: str | None = None,
    *,
    path: Path | str | None = None,
    base_url: str | None = None,
) -> bool:
    """DELETE /connectors/{name}; False when there was nothing to delete. The replication slot stays."""
    name = name or load_connector_file(path)["name"]
    response = _call("DELETE", f"{_base_url(settings, base_url)}/connectors/{name}")
    if response.status_code == 404:
        return False
    if response.status_code not in (200, 204):
        raise ConnectorError(
            f"deleting connector {name}: HTTP {response.status_code}: {_error_text(response)}"
        )
    return True


def _summarise_trace(trace: str) -> str:
    # Connect's trace starts with a generic wrapper; the "Caused by" lines say what actually went wrong.
    lines = trace.splitlines()
    causes = [line.strip() for line in lines if line.startswith("Caused by:")]
    head = lines[:8]
    return "\n".join(head + (["\t..."] if len(lines) > 8 else []) + causes)


def _failures(status: dict[str, Any]) -> list[str]:
    parts = [("connector", status.get("connector", {}))]
    parts += [(f"task {t.get('id')}", t) for t in status.get("tasks", [])]
    return [f"{label} FAILED on {p.get('worker_id')}:\n{_summarise_trace(str(p.get('trace', '(no trace)')))}"
            for label, p in parts if p.get("state") == "FAILED"]  # fmt: skip


def _hint(failures: list[str], settings: Settings) -> str:
    text = "\n".join(failures)
    if "No table filters found" in text or "Unable to create filtered publication" in text:
        return (
            f"the publication only covers {settings.source_table}, which must exist before the connector "
            f"starts: create it, or set {env_name('source_table')}"
        )
    if "password authentication failed" in text or "Connection refused" in text:
        return f"the worker cannot log in to the database: check {env_name('database_url')}"
    return f"check the database ({env_name('database_url')}) and the Connect worker log"


def _running(status: dict[str, Any]) -> bool:
    tasks = status.get("tasks", [])
    return (
        status.get("connector", {}).get("state") == "RUNNING"
        and bool(tasks)
        and all(t.get("state") == "RUNNING" for t in tasks)
    )


def register_connector(
    settings: Settings,
    path: Path | str | None = None,
    *,
    timeout_s: float = 120.0,
    base_url: str | None = None,
    progress: Callable[[str], None] = _silent,
    tables: tuple[str, ...] = (),
) -> str:
    """Create or update the connector (PUT is idempotent) and wait until it and its task are RUNNING."""
    spec = connector_config(settings, path, tables)
    name, root = spec["name"], _base_url(settings, base_url)
    deadline = time.monotonic() + timeout_s
    while True:
        response = _call("PUT", f"{root}/connectors/{name}/config", json=spec["config"])
        # 409: the worker is rebalancing (e.g. just started); the same PUT succeeds a moment later
        if response.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if response.status_code not in (200, 201):
        raise ConnectorError(
            f"Kafka Connect at {root} rejected connector {name}: "
            f"HTTP {response.status_code}: {_error_text(response)}"
        )
    progress(
        f"connector {name}: {'created' if response.status_code == 201 else 'updated'}, waiting for RUNNING"
    )
    restarted_at: float | None = None
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status = connector_status(settings, name, base_url=root)
        if status is not None and _running(status):
            progress(f"connector {name}: RUNNING")
            return name
        failures = _failures(status) if status is not None else []
        if failures and restarted_at is None:
            # a task that failed earlier (say, the database was down) stays FAILED until restarted
            progress(f"connector {name}: FAILED, restarting it once")
            params = {"includeTasks": "true", "onlyFailed": "true"}
            _call("POST", f"{root}/connectors/{name}/restart", params=params)
            restarted_at = time.monotonic()
        elif failures and restarted_at is not None and time.monotonic() - restarted_at > 5.0:
            raise ConnectorError(
                f"connector {name} failed; {_hint(failures, settings)}:\n" + "\n".join(failures)
            )
        time.sleep(1.0)
    raise ConnectorError(
        f"connector {name} not RUNNING after {timeout_s:.0f} s; last status: {json.dumps(status, indent=2)}"
    )
