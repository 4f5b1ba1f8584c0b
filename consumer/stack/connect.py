"""A one-node Kafka Connect worker (distributed mode) with the Debezium Postgres plugin.

Distributed mode, even with one node, keeps connector configs and source offsets in Kafka topics, so a
restarted worker resumes where Debezium left off, and the REST API is the one users have on their own
Connect clusters.
"""

from __future__ import annotations

import os

import httpx

from consumer.settings import Settings, env_name
from consumer.stack.maven import JarDirs
from consumer.stack.process import (
    LOG4J2_CONSOLE,
    LocalServer,
    Progress,
    StackError,
    java_command,
    silent,
    start_detached,
    wait_until,
    write_properties,
)

MAIN_CLASS = "org.apache.kafka.connect.cli.ConnectDistributed"
POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"
GROUP_ID = "cdc-embedder-connect"
# The connector JSON names the database only through these variables, resolved inside the worker, so the
# password is never part of a REST payload, the connector's stored config, or a log line.
PG_ENV = {"hostname": "CDC_PG_HOST", "port": "CDC_PG_PORT", "user": "CDC_PG_USER",
          "password": "CDC_PG_PASSWORD", "dbname": "CDC_PG_DATABASE"}  # fmt: skip
SASL_PASSWORD_ENV = "CDC_KAFKA_SASL_PASSWORD"


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for part, value in settings.database_parts().items():
        env[PG_ENV[part]] = value
    if settings.kafka_sasl_password is not None:
        env[SASL_PASSWORD_ENV] = settings.kafka_sasl_password.get_secret_value()
    return env


def client_security(settings: Settings) -> dict[str, str]:
    """Client settings for an external Kafka; the embedded broker is plaintext on loopback."""
    if settings.uses_embedded_kafka:
        return {}
    props: dict[str, str] = {"security.protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism and settings.kafka_sasl_username:
        module = (
            "plain.PlainLoginModule" if settings.kafka_sasl_mechanism == "PLAIN" else "scram.ScramLoginModule"
        )
        props["sasl.mechanism"] = settings.kafka_sasl_mechanism
        props["sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.{module} required "
            f'username="{settings.kafka_sasl_username}" password="${{env:{SASL_PASSWORD_ENV}}}";'
        )
    if settings.kafka_ssl_cafile is not None:
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.location"] = str(settings.kafka_ssl_cafile.resolve())
    if settings.kafka_ssl_certfile or settings.kafka_ssl_keyfile:
        raise StackError(
            "the local Connect worker does not do TLS client certificates: run your own Kafka Connect "
            f"and set {env_name('connect_url')}, or unset {env_name('kafka_ssl_certfile')}/"
            f"{env_name('kafka_ssl_keyfile')}"
        )
    return props


class LocalConnect(LocalServer):
    name = "connect"
    what = "Kafka Connect"
    # stop: LocalServer's TERM lets the worker commit source offsets and leave the group, so the next
    # start is quick

    def __init__(self, settings: Settings, jars: JarDirs) -> None:
        self.settings = settings
        self.jars = jars
        self.port = settings.stack_connect_port
        self.url = f"http://127.0.0.1:{self.port}"
        stack_dir = settings.stack_dir.resolve()
        self.home = stack_dir / "connect"
        self.properties = self.home / "worker.properties"
        self.log4j = self.home / "log4j2.properties"
        self.log_file = stack_dir / "logs" / "connect.log"
        self.pid_file = stack_dir / "run" / "connect.pid"

    def _write_config(self) -> None:
        embedded = self.settings.uses_embedded_kafka
        props: dict[str, object] = {
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": GROUP_ID,
            "config.storage.topic": f"{GROUP_ID}-configs",
            "offset.storage.topic": f"{GROUP_ID}-offsets",
            "status.storage.topic": f"{GROUP_ID}-status",
            # one broker locally; an external cluster applies its own default
            "config.storage.replication.factor": 1 if embedded else -1,
            "offset.storage.replication.factor": 1 if embedded else -1,
            "status.storage.replication.factor": 1 if embedded else -1,
            "offset.storage.partitions": 5,
            "status.storage.partitions": 1,
            # a restarted worker resumes from at most one second ago instead of the default minute
            "offset.flush.interval.ms": 1000,
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": False,
            "value.converter.schemas.enable": False,
            "listeners": self.url,
            "rest.advertised.host.name": "127.0.0.1",
            "rest.advertised.port": self.port,
            "plugin.path": self.jars.debezium_plugin_path,
            # Debezium ships ServiceLoader manifests; skipping the reflective scan saves seconds per start
            "plugin.discovery": "service_load",
            "topic.creation.enable": True,
            "config.providers": "env",
            "config.providers.env.class": "org.apache.kafka.common.config.provider.EnvVarConfigProvider",
        }
        security = client_security(self.settings)
        for prefix in ("", "producer.", "consumer.", "admin."):
            props.update({prefix + key: value for key, value in security.items()})
        write_properties(
            self.properties, props, header="Kafka Connect worker of the cdc-embedder local stack"
        )
        self.log4j.write_text(LOG4J2_CONSOLE)

    def _get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0)

    def _ready(self) -> bool:
        try:
            if self._get("/").status_code != 200:
                return False
            plugins = self._get("/connector-plugins")
        except httpx.HTTPError:
            return False
        return plugins.status_code == 200 and any(
            p.get("class") == POSTGRES_CONNECTOR for p in plugins.json()
        )

    def _marker(self) -> str:
        return str(self.properties)

    def _ports(self) -> list[tuple[int, str, str]]:
        return [(self.port, "Kafka Connect", env_name("stack_connect_port"))]

    def _location(self) -> str:
        return f"at {self.url}"

    def _status_details(self) -> dict[str, object]:
        return {"url": self.url}

    def start(self, progress: Progress = silent, timeout_s: float = 180.0) -> None:
        if not self._should_start(progress):
            return
        if not any(self.jars.debezium.glob("debezium-connector-postgres-*.jar")):
            raise StackError(
                f"the Debezium plugin is missing from {self.jars.debezium}: run `stack up` again"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_config()
        argv = java_command(
            classpath_dirs=[self.jars.connect],
            main_class=MAIN_CLASS,
            args=[str(self.properties)],
            log4j_config=self.log4j,
        )
        pid = start_detached(
            argv, log_file=self.log_file, pid_file=self.pid_file, env=worker_env(self.settings), cwd=self.home
        )
        progress(f"connect: started (pid {pid}), waiting for the REST API and the Debezium plugin ...")
        try:
            wait_until(
                self._ready, what="Kafka Connect", timeout_s=timeout_s, log_file=self.log_file, pid=pid
            )
        except StackError as exc:
            raise StackError(
                f"{exc}\nIs Kafka reachable at {self.settings.bootstrap_servers}? "
                f"(set {env_name('kafka_bootstrap_servers')})"
            ) from None
        progress(f"connect: ready at {self.url}")
