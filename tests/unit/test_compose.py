"""docker-compose.yml: valid against the Compose specification, pinned, ordered, and consistent with the
code, the SQL, the connector file and the observability assets. No Docker engine is needed.

The schema is the compose-spec JSON schema that the PyPI package check-jsonschema vendors
(builtin "vendor.compose-spec"). Variables are interpolated with their ${VAR:-default} defaults, as
`docker compose` does with an empty environment.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from consumer import health
from consumer.connectors import connector_config
from consumer.settings import Settings
from tests.unit.test_deploy_manifests import WORST_CASE_BATCH_S

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CONNECTOR_JSON = ROOT / "connectors" / "documents.json"
ALERT_RULES = ROOT / "deploy" / "observability" / "alert-rules.yml"
DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"
ROLES_SQL = ROOT / "deploy" / "sql" / "roles.sql"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SETTINGS_ENV = {f"CDC_{name.upper()}" for name in Settings.model_fields}
ONE_SHOT = {"register-connector"}


def interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$, with no variable set."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value
    out = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m[2] or "", value.replace("$$", "\0"))
    assert "$" not in out, f"unsupported interpolation in {value!r}"
    return out.replace("\0", "$")


def _variables(value: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", value))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = interpolate(raw)
    return result


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """container path -> (host path, read-only) for bind mounts given as ./relative paths."""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("./"):
            result[target] = ((ROOT / source).resolve(), mode == ["ro"])
    return result


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist (yet); docker-compose.yml mounts it")
    return path


# --- schema and images -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    text = (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def test_valid_against_the_compose_spec(raw: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    validator = jsonschema.validators.validator_for(compose_schema)(compose_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]
    assert not errors, "\n".join(errors)


def test_schema_rejects_a_broken_file(raw: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    """The validation above can fail."""
    broken = json.loads(json.dumps(raw))
    broken["services"]["consumer"]["depends_on"]["kafka"]["condition"] = "service_up"
    broken["services"]["kafka"]["helthcheck"] = broken["services"]["kafka"].pop("healthcheck")
    validator = jsonschema.validators.validator_for(compose_schema)(compose_schema)
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image (a built service still gets a tagged name)"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in {"", "latest"}, f"{name}: {image} is not pinned"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, (source, read_only) in _mounts(service).items():
            assert source.exists(), f"{name}: {source.relative_to(ROOT)} (mounted at {target}) is missing"
            assert read_only or target == "/var/lib/postgresql/data", f"{name}: mount {target} read-write"


# --- health and order --------------------------------------------------------------------------------


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in {"CMD", "CMD-SHELL"} and not check.get("disable"), name


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in services[name].get("depends_on", {}).items()}

    for name in services:
        for dependency, condition in conditions(name).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"
            else:
                assert condition == "service_completed_successfully" and dependency in ONE_SHOT
    assert conditions("connect") == {"kafka": "service_healthy", "postgres": "service_healthy"}
    assert conditions("register-connector") == {"connect": "service_healthy"}
    assert conditions("consumer") == {
        "postgres": "service_healthy",
        "kafka": "service_healthy",
        "register-connector": "service_completed_successfully",
    }
    assert conditions("grafana") == {"prometheus": "service_healthy"}


# --- Postgres ----------------------------------------------------------------------------------------


def test_postgres_is_set_up_for_logical_decoding(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("pgvector/pgvector:")
    settings = dict(
        arg.split("=", 1) for flag, arg in zip(postgres["command"], postgres["command"][1:], strict=False)
        if flag == "-c"
    )  # fmt: skip
    assert settings["wal_level"] == "logical"
    assert int(settings["max_replication_slots"]) >= 1 and int(settings["max_wal_senders"]) >= 1


def test_postgres_init_runs_schema_and_roles(
    raw: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    postgres = services["postgres"]
    mounts = _mounts(postgres)
    scripts = {t: s for t, (s, _) in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")}
    assert len(scripts) == 1
    (script,) = scripts.values()
    text = script.read_text()
    sql_dir = next(t for t, (s, _) in mounts.items() if s == (ROOT / "deploy" / "sql").resolve())
    assert f"{sql_dir}/schema.sql" in text and f"{sql_dir}/roles.sql" in text
    assert text.index("schema.sql") < text.index("roles.sql")
    # every psql variable roles.sql reads is passed, from a variable the container has
    # (but `part`, which defaults to both parts in one database, as compose has them)
    wanted = set(re.findall(r":'(\w+)'", ROLES_SQL.read_text())) - {"part"}
    passed = dict(re.findall(r'-v (\w+)="\$(\w+)"', text))
    assert wanted and set(passed) == wanted
    assert set(passed.values()) <= set(_env(postgres))
    assert not re.search(r"PASSWORD\s+'", ROLES_SQL.read_text(), re.I), "a literal password in roles.sql"


# --- Kafka Connect and the connector --------------------------------------------------------------------


def test_connect_resolves_the_connector_placeholders(
    raw: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    connect = _env(services["connect"])
    assert connect["CONNECT_CONFIG_PROVIDERS"] == "env"
    assert connect["CONNECT_CONFIG_PROVIDERS_ENV_CLASS"] == (
        "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    )
    placeholders = set(re.findall(r"\$\{env:(\w+)\}", _require(CONNECTOR_JSON).read_text()))
    assert placeholders and placeholders <= set(connect), placeholders - set(connect)
    assert {k for k in connect if k.startswith("CDC_")} == placeholders, "CDC_* on Connect: placeholders only"
    pattern = connect.get("CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN")
    if pattern:
        assert all(re.fullmatch(pattern, name) for name in placeholders)
    postgres = _env(services["postgres"])
    assert connect["CDC_PG_HOST"] == "postgres" and connect["CDC_PG_PORT"] == "5432"
    assert connect["CDC_PG_DATABASE"] == postgres["POSTGRES_DB"]
    roles = ROLES_SQL.read_text()
    assert re.search(rf"ALTER ROLE {connect['CDC_PG_USER']} WITH LOGIN REPLICATION", roles)
    # the Connect password and the one roles.sql sets come from the same compose variable
    raw_connect, raw_postgres = (
        raw["services"]["connect"]["environment"],
        raw["services"]["postgres"]["environment"],
    )
    assert _variables(raw_connect["CDC_PG_PASSWORD"]) == _variables(raw_postgres["DEBEZIUM_PASSWORD"])
    assert connect["CDC_PG_PASSWORD"] == postgres["DEBEZIUM_PASSWORD"]


def test_registration_job_sends_the_connector_file(services: dict[str, dict[str, Any]]) -> None:
    job = services["register-connector"]
    assert job["image"] == services["consumer"]["image"] and job["build"] == services["consumer"]["build"]
    command = job["command"]
    assert command[:2] == ["connector", "register"] and command[2] == "--file"
    host, read_only = _mounts(job)[command[3]]
    assert host == CONNECTOR_JSON.resolve() and read_only
    settings = Settings.from_env_map(_env(job))
    assert settings.connect_rest_url == "http://connect:8083"
    # what `cdc-embedder connector register` PUTs is exactly the file's "config"
    source = json.loads(_require(CONNECTOR_JSON).read_text())
    sent = connector_config(settings, CONNECTOR_JSON)
    assert sent["name"] == source["name"]
    assert sent["config"] == source["config"]


# --- the consumer -----------------------------------------------------------------------------------


def test_consumer_settings_exist_and_load(raw: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    consumer = services["consumer"]
    assert (
        consumer["build"]["dockerfile"] == "deploy/docker/Dockerfile" and consumer["build"]["context"] == "."
    )
    env = _env(consumer)
    unknown = {k for k in env if k.startswith("CDC_")} - SETTINGS_ENV
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    # the only other CDC_* variables in the file are Connect's connector placeholders
    for name, service in services.items():
        if name not in {"consumer", "register-connector", "connect"}:
            assert not {k for k in _env(service) if k.startswith("CDC_")} - {"CDC_EMBEDDER_DB_PASSWORD"}, name
    settings = Settings.from_env_map(env)
    postgres = _env(services["postgres"])
    url = urlsplit(settings.dsn)
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/" + postgres["POSTGRES_DB"])
    assert url.username == "cdc_embedder" and url.password == postgres["CDC_EMBEDDER_DB_PASSWORD"]
    assert settings.bootstrap_servers == "kafka:9092"
    assert "PLAINTEXT://kafka:9092" in _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert settings.source_topic == "cdc.public.documents"
    partitions = json.loads(CONNECTOR_JSON.read_text())["config"]["topic.creation.default.partitions"]
    assert (
        _env(services["kafka"])["KAFKA_NUM_PARTITIONS"] == partitions == str(settings.stack_topic_partitions)
    )


def test_consumer_health_check_is_the_images(services: dict[str, dict[str, Any]]) -> None:
    test = services["consumer"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    healthcheck = next(
        line for line in DOCKERFILE.read_text().splitlines() if line.strip().startswith("CMD [")
    )
    assert test[1:] == json.loads(healthcheck.strip()[len("CMD ") :])
    assert f"http://127.0.0.1:{Settings().http_port}{health.LIVENESS_PATH}" in test[-1]


def test_consumer_gets_time_to_drain(services: dict[str, dict[str, Any]]) -> None:
    settings = Settings.from_env_map(_env(services["consumer"]))
    grace = services["consumer"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= settings.shutdown_grace_s + WORST_CASE_BATCH_S


# --- Prometheus and Grafana -------------------------------------------------------------------------------


def test_prometheus_scrapes_the_consumer_and_loads_the_alert_rules(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = _mounts(services["prometheus"])
    config_path = next(t for t in mounts if t.endswith("prometheus.yml"))
    assert f"--config.file={config_path}" in services["prometheus"]["command"]
    config = yaml.safe_load(mounts[config_path][0].read_text())
    rules_target = next(t for t, (s, _) in mounts.items() if s == _require(ALERT_RULES).resolve())
    assert any(PurePosixPath(rules_target).match(glob) for glob in config["rule_files"])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == health.METRICS_PATH
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["consumer"] and sd["port"] == Settings().http_port
    jobs = set(re.findall(r'job="([^"]+)"', ALERT_RULES.read_text()))
    assert jobs == {job["job_name"]}, "alert rules select another job"


def test_grafana_provisions_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"][0]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cdc-embedder.yml").read_text())["providers"]
    dashboard_target = next(t for t, (s, _) in mounts.items() if s == _require(DASHBOARD).resolve())
    assert PurePosixPath(dashboard_target).parent == PurePosixPath(provider["options"]["path"])
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    kinds = {v.get("query") for v in dashboard["templating"]["list"] if v.get("type") == "datasource"}
    assert kinds <= {"prometheus"}
