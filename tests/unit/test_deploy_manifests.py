"""The Kubernetes manifests: `kustomize build deploy/`, validated and checked against the code.

Built-in kinds (Namespace, ServiceAccount, ConfigMap, Deployment, Service, PodDisruptionBudget) are
validated with the PyPI package kubernetes-validate, strictly (unknown fields are errors), against the
oldest and the newest Kubernetes version it knows. It ships no schema for the custom resources
(PodMonitor, PrometheusRule, ScaledObject, TriggerAuthentication, KafkaConnect, KafkaConnector,
KafkaTopic) and none can be fetched offline, so for those the tests below check the required structure
of each CRD by hand: apiVersion, kind, the required spec fields and their types, and the
cross-references between objects.

Consistency with the rest of the repository: every CDC_* variable is a Settings field and the settings
load; probe paths and the port are consumer.health's and Settings().http_port; the PrometheusRule is
deploy/observability/alert-rules.yml; the dashboard ConfigMap is deploy/observability/grafana-dashboard.json;
the KafkaConnector is connectors/documents.json; KEDA never scales past the topic's partitions; the
KafkaTopics are the retry and dead-letter topics the consumer would create (consumer.topics).

kustomize comes from the Go module proxy (see the Makefile); the test looks for it in $KUSTOMIZE, next
to this Python (.venv/bin) and on PATH, and fails when it is missing rather than skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from consumer import health
from consumer.settings import Settings
from consumer.topics import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, plan_topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONNECTOR_JSON = ROOT / "connectors" / "documents.json"
ALERT_RULES = DEPLOY / "observability" / "alert-rules.yml"
DASHBOARD = DEPLOY / "observability" / "grafana-dashboard.json"
README = DEPLOY / "README.md"
SETTINGS_ENV = {f"CDC_{name.upper()}" for name in Settings.model_fields}
SECRET_NAME = "cdc-embedder-credentials"
SECRET_PLACEHOLDERS = {
    "CDC_DATABASE_URL": "postgresql://cdc_embedder:x@db:5432/cdc",
    "CDC_KAFKA_SASL_USERNAME": "cdc-embedder",
    "CDC_KAFKA_SASL_PASSWORD": "x",
}
# The oldest Kubernetes still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "KafkaConnect": "kafka.strimzi.io/v1beta2",
    "KafkaConnector": "kafka.strimzi.io/v1beta2",
    "KafkaTopic": "kafka.strimzi.io/v1beta2",
}
# Worst case for one batch after SIGTERM: 256 texts x 512 tokens through gte-small on 2 CPUs (131,000
# tokens: 40 s at the 3,300 tokens/s of fp32 on the bench's host) plus the write.
WORST_CASE_BATCH_S = 90


def _kustomize() -> str:
    candidates = [os.environ.get("KUSTOMIZE", ""), str(Path(sys.executable).parent / "kustomize")]
    candidates.append(shutil.which("kustomize") or "")
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "kustomize not found ($KUSTOMIZE, .venv/bin/kustomize, PATH): install it with "
        "`GOBIN=$PWD/.venv/bin go install sigs.k8s.io/kustomize/kustomize/v5@v5.8.2` (make dev)"
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist (yet); these checks need it")
    return path


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    for source in (CONNECTOR_JSON, ALERT_RULES, DASHBOARD):
        _require(source)
    result = subprocess.run(
        [_kustomize(), "build", str(DEPLOY)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kustomize build deploy/ failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert docs, "kustomize rendered nothing"
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _configmap_env(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    refs = [
        s["configMapRef"]["name"] for s in _container(deployment).get("envFrom", []) if "configMapRef" in s
    ]
    assert len(refs) == 1, "the consumer takes its settings from exactly one ConfigMap"
    data: dict[str, str] = _one(docs, "ConfigMap", refs[0])["data"]
    return data


def _pod_settings(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> Settings:
    """Settings as a pod gets them: the ConfigMap plus the Secret's keys (placeholder values)."""
    return Settings.from_env_map({**_configmap_env(docs, deployment), **SECRET_PLACEHOLDERS})


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _quantity_bytes(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(value))
    assert match, f"unparsable quantity {value!r}"
    return float(match[1]) * units.get(match[2] or "", 1)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# --- rendering and schema validation -----------------------------------------------------------------


def test_kustomization_includes_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {f"k8s/{p.name}" for p in K8S.glob("*.yaml")}
    assert listed == on_disk, f"kustomization.yaml resources vs deploy/k8s/*.yaml: {listed ^ on_disk}"


def test_renders_the_expected_objects(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    expected = [
        "ConfigMap",
        "ConfigMap",
        "CronJob",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Service",
    ]
    expected += ["ServiceAccount", *CUSTOM_KINDS, "KafkaTopic"]  # retry and dead letters
    assert kinds == sorted(expected)
    assert all(d["metadata"].get("namespace") == "cdc-embedder" for d in rendered if d["kind"] != "Namespace")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(rendered: list[dict[str, Any]], version: str) -> None:
    checked = 0
    for doc in rendered:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == 8


def test_validator_catches_a_broken_deployment(rendered: list[dict[str, Any]]) -> None:
    """The validation above can fail: an unknown field and a wrong type are both rejected."""
    broken = json.loads(json.dumps(_one(rendered, "Deployment")))
    _container(broken)["livenesProbe"] = {"httpGet": {"path": "/livez", "port": 9400}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(_one(rendered, "Deployment")))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_custom_resources_have_the_crds_api_versions(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]], doc["kind"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["kind"]
            assert isinstance(doc["spec"], dict)


# --- the Deployment --------------------------------------------------------------------------------


def test_probes_and_port_match_the_health_endpoint(rendered: list[dict[str, Any]]) -> None:
    container = _container(_one(rendered, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": Settings().http_port}
    assert container["startupProbe"]["httpGet"] == {"path": health.STARTUP_PATH, "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": health.LIVENESS_PATH, "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": health.READINESS_PATH, "port": "http-metrics"}
    service = _one(rendered, "Service")
    assert service["spec"]["ports"] == [
        {
            "name": "http-metrics",
            "port": Settings().http_port,
            "targetPort": "http-metrics",
            "protocol": "TCP",
        }
    ]
    endpoints = _one(rendered, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http-metrics", health.METRICS_PATH)]


def test_startup_budget_covers_model_loading(rendered: list[dict[str, Any]]) -> None:
    probe = _container(_one(rendered, "Deployment"))["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 180
    liveness = _container(_one(rendered, "Deployment"))["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 60, "liveness should be quick"


def test_termination_grace_outlasts_shutdown_grace(rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    settings = _pod_settings(rendered, deployment)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_grace_s + WORST_CASE_BATCH_S


def test_resources_fit_gte_small(rendered: list[dict[str, Any]]) -> None:
    resources = _container(_one(rendered, "Deployment"))["resources"]
    limit = _quantity_bytes(resources["limits"]["memory"])
    assert 1.25 * 2**30 <= limit <= 2 * 2**30
    assert _quantity_bytes(resources["requests"]["memory"]) <= limit
    assert "cpu" in resources["requests"]


def test_runs_non_root_with_read_only_root(rendered: list[dict[str, Any]]) -> None:
    pod = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = _container(_one(rendered, "Deployment"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    volume = next(v for v in pod["volumes"] if v["name"] == tmp[0]["name"])
    assert "emptyDir" in volume
    assert pod["automountServiceAccountToken"] is False


def test_audit_cronjob_repairs_with_the_consumers_image_and_settings(rendered: list[dict[str, Any]]) -> None:
    cron = _one(rendered, "CronJob", "cdc-embedder-audit")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    consumer = _container(_one(rendered, "Deployment"))
    assert container["args"] == ["audit", "--repair"]
    assert container["image"] == consumer["image"]
    assert container["envFrom"] == consumer["envFrom"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True


def test_image_is_pinned(rendered: list[dict[str, Any]]) -> None:
    image = _container(_one(rendered, "Deployment"))["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" in name and tag and tag != "latest", image


def test_settings_come_from_configmap_and_secret_only(rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    container = _container(deployment)
    secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert secrets == [SECRET_NAME]
    assert not [d for d in rendered if d["kind"] == "Secret"], "credentials must not be in the manifests"
    for var in container.get("env", []):
        assert "value" not in var or not re.search(r"PASSWORD|SECRET|TOKEN|DATABASE_URL", var["name"]), var
    config = _configmap_env(rendered, deployment)
    unknown = {k for k in config if k not in SETTINGS_ENV}
    unknown |= {v["name"] for v in container.get("env", []) if v["name"] not in SETTINGS_ENV}
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    assert not {"CDC_DATABASE_URL", "CDC_KAFKA_SASL_PASSWORD"} & set(config), "credentials in the ConfigMap"
    # The ConfigMap plus the Secret's keys make valid settings (SASL needs all three, for one).
    settings = _pod_settings(rendered, deployment)
    assert settings.http_port == container["ports"][0]["containerPort"]
    assert settings.kafka_ssl_cafile is not None
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(str(settings.kafka_ssl_cafile).startswith(m + "/") for m in mounts), "CA file not mounted"


def test_readme_documents_the_secret(rendered: list[dict[str, Any]]) -> None:
    """Every key the manifests read from the Secret is in the README's `kubectl create secret` command."""
    text = _require(README).read_text()
    command = re.search(
        rf"kubectl (?:-n \S+ )?create secret generic {SECRET_NAME}(.*?)(?:\n\n|```)", text, re.S
    )
    assert command, f"deploy/README.md lacks `kubectl create secret generic {SECRET_NAME} ...`"
    documented = set(re.findall(r"--from-literal=(\w+)=", command[1]))
    used = {"CDC_DATABASE_URL", "CDC_KAFKA_SASL_PASSWORD"}
    trigger_auth = _one(rendered, "TriggerAuthentication")["spec"]["secretTargetRef"]
    used |= {ref["key"] for ref in trigger_auth if ref["name"] == SECRET_NAME}
    assert used <= documented, f"undocumented Secret keys: {used - documented}"


def test_pod_disruption_budget_selects_the_pods(rendered: list[dict[str, Any]]) -> None:
    pdb = _one(rendered, "PodDisruptionBudget")["spec"]
    labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") is not None


# --- observability -----------------------------------------------------------------------------------


def test_prometheus_rule_is_the_alert_rules_file(rendered: list[dict[str, Any]]) -> None:
    rule = _one(rendered, "PrometheusRule")
    source = yaml.safe_load(ALERT_RULES.read_text())
    assert rule["spec"]["groups"] == source["groups"], "run: python deploy/k8s/generate.py"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item) and item["expr"]


def test_pod_monitor_job_label_matches_the_alert_rules(rendered: list[dict[str, Any]]) -> None:
    monitor = _one(rendered, "PodMonitor")["spec"]
    labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    jobs = set(re.findall(r'job="([^"]+)"', ALERT_RULES.read_text()))
    assert jobs, "alert rules name no job"
    assert jobs == {labels[monitor["jobLabel"]]}, "the alerts' job label differs from the scraped job"


def test_dashboard_configmap_is_the_dashboard_file(rendered: list[dict[str, Any]]) -> None:
    dashboards = [
        d
        for d in rendered
        if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})
    ]
    assert len(dashboards) == 1
    configmap = dashboards[0]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert len(configmap["data"]) == 1
    (content,) = configmap["data"].values()
    assert content == DASHBOARD.read_text()
    assert json.loads(content)["panels"]


# --- KEDA ---------------------------------------------------------------------------------------------


def test_keda_scales_on_the_consumer_group_up_to_the_partition_count(rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    scaled = _one(rendered, "ScaledObject")["spec"]
    settings = _pod_settings(rendered, deployment)
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.consumer_group == "cdc-embedder"
    assert meta["topic"] == settings.source_topic == "cdc.public.documents"
    assert meta["bootstrapServers"] == settings.kafka_bootstrap_servers
    assert int(meta["lagThreshold"]) > 0
    partitions = int(json.loads(CONNECTOR_JSON.read_text())["config"]["topic.creation.default.partitions"])
    assert scaled["maxReplicaCount"] == partitions == 3
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    auth = _one(rendered, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"username", "password"} <= params
    if settings.kafka_security_protocol.startswith("SASL"):
        keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
        assert meta["sasl"] == keda_sasl[str(settings.kafka_sasl_mechanism)]
    if settings.kafka_security_protocol.endswith("SSL"):
        assert meta["tls"] == "enable" and "ca" in params


# --- Strimzi ------------------------------------------------------------------------------------------


def test_kafka_connect_builds_debezium_and_resolves_env_placeholders(rendered: list[dict[str, Any]]) -> None:
    connect = _one(rendered, "KafkaConnect")
    spec = connect["spec"]
    assert connect["metadata"]["annotations"]["strimzi.io/use-connector-resources"] == "true"
    assert isinstance(spec["bootstrapServers"], str) and spec["bootstrapServers"]
    assert isinstance(spec["replicas"], int)
    config = spec["config"]
    for key in ("group.id", "config.storage.topic", "offset.storage.topic", "status.storage.topic"):
        assert config[key], key
    assert config["config.providers"] == "env"
    assert (
        config["config.providers.env.class"] == "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    )
    assert spec["build"]["output"]["type"] in {"docker", "imagestream"} and spec["build"]["output"]["image"]
    artifacts = [a for plugin in spec["build"]["plugins"] for a in plugin["artifacts"]]
    assert [(a["type"], a["group"], a["artifact"]) for a in artifacts] == [
        ("maven", "io.debezium", "debezium-connector-postgres")
    ]
    assert artifacts[0]["version"].endswith(".Final")
    # every ${env:NAME} of the connector is an environment variable of the Connect pods
    placeholders = set(re.findall(r"\$\{env:([A-Z0-9_]+)\}", CONNECTOR_JSON.read_text()))
    assert placeholders, "connectors/documents.json uses no ${env:...} placeholders"
    env = {e["name"]: e for e in spec["template"]["connectContainer"]["env"]}
    assert placeholders <= set(env), f"missing in the Connect pods: {placeholders - set(env)}"
    pattern = config.get("config.providers.env.param.allowlist.pattern")
    if pattern:
        assert all(re.fullmatch(pattern, name) for name in placeholders)
    secret_like = [n for n in env if "PASSWORD" in n]
    assert secret_like and all("valueFrom" in env[n] and "value" not in env[n] for n in secret_like)


def test_kafka_connector_is_the_connector_file(rendered: list[dict[str, Any]]) -> None:
    source = json.loads(CONNECTOR_JSON.read_text())
    connector = _one(rendered, "KafkaConnector")
    spec = connector["spec"]
    assert connector["metadata"]["name"] == source["name"]
    assert (
        connector["metadata"]["labels"]["strimzi.io/cluster"]
        == _one(rendered, "KafkaConnect")["metadata"]["name"]
    )
    assert spec["tasksMax"] == 1
    assert not {"name", "connector.class", "tasks.max"} & set(spec["config"]), "Strimzi sets these itself"
    as_sent = {**spec["config"], "connector.class": spec["class"], "tasks.max": str(spec["tasksMax"])}
    assert as_sent == source["config"], "run: python deploy/k8s/generate.py"
    assert all(isinstance(v, str) for v in spec["config"].values()), "Connect config values are strings"


def test_debezium_version_is_the_same_everywhere(rendered: list[dict[str, Any]]) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["connect"]["image"]
    assert image.startswith("quay.io/debezium/connect:")
    version = image.rpartition(":")[2]
    artifacts = [
        a for p in _one(rendered, "KafkaConnect")["spec"]["build"]["plugins"] for a in p["artifacts"]
    ]
    assert {a["version"] for a in artifacts} == {version}
    pom = ROOT / "deploy" / "local" / "debezium" / "pom.xml"
    if pom.is_file():  # the local (no-Docker) stack's plugin
        match = re.search(r"<debezium.version>([^<]+)</debezium.version>", pom.read_text())
        assert match and match[1] == version, "deploy/local/debezium/pom.xml pins another Debezium"


def test_no_literal_password_anywhere(rendered: list[dict[str, Any]]) -> None:
    """A "password" field holds an ${env:...} placeholder or names a key of a Secret, never a value."""
    seen = 0
    for doc in rendered:
        for node in _walk(doc):
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(value, str) and re.search(r"password", str(key), re.I):
                        seen += 1
                        assert value.startswith("${env:") or value == "password", (doc["kind"], key, value)
    assert seen >= 2  # the connector's database.password and Strimzi's passwordSecret.password


def test_kafka_topics_are_what_the_consumer_would_create(rendered: list[dict[str, Any]]) -> None:
    """Same partitions, replication, min.insync, retention and size as consumer.kafka.ensure_topics."""
    settings = _pod_settings(rendered, _one(rendered, "Deployment"))
    config = json.loads(CONNECTOR_JSON.read_text())["config"]
    source_partitions = int(config["topic.creation.default.partitions"])
    # a Debezium-created source topic has the brokers' default size; Strimzi's "cdc" cluster has 3 brokers
    plans = plan_topics(settings, source_partitions, KAFKA_DEFAULT_MAX_MESSAGE_BYTES, brokers=3)
    topics = {d["spec"]["topicName"]: d for d in rendered if d["kind"] == "KafkaTopic"}
    assert set(topics) == {settings.retry_topic, settings.dlq_topic} == {p.name for p in plans}
    # Strimzi names a cluster's bootstrap Service <cluster>-kafka-bootstrap: the consumer's brokers
    cluster = str(settings.kafka_bootstrap_servers).split("-kafka-bootstrap:")[0]
    for plan in plans:
        topic = topics[plan.name]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster == "cdc"
        spec = topic["spec"]
        assert isinstance(spec["partitions"], int) and isinstance(spec["replicas"], int)
        assert (spec["partitions"], spec["replicas"]) == (plan.partitions, plan.replication_factor)
        assert {k: str(v) for k, v in spec["config"].items()} == plan.configs, plan.name
    dlq = topics[settings.dlq_topic]["spec"]["config"]
    assert dlq["retention.ms"] == dlq["retention.bytes"] == -1, "dead letters never expire"
