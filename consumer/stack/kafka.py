"""A single-node Kafka 4 (KRaft: one process is both broker and controller) for the local stack."""

from __future__ import annotations

import base64
import socket
import struct
import subprocess
import uuid

from consumer.settings import Settings, env_name
from consumer.stack.maven import JarDirs
from consumer.stack.process import (
    LOG4J2_CONSOLE,
    LocalServer,
    Progress,
    StackError,
    java_command,
    log_tail,
    silent,
    start_detached,
    wait_until,
    write_properties,
)

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
_API_VERSIONS, _METADATA = 18, 3


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding, never starting with "-".
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _request(sock: socket.socket, api_key: int, version: int, body: bytes, correlation_id: int) -> bytes:
    client = b"cdc-embedder-stack"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client)) + client
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _read_exact(sock, 4))[0]
    response = _read_exact(sock, size)
    if struct.unpack(">i", response[:4])[0] != correlation_id:
        raise OSError("Kafka answered another request")
    return response[4:]


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed by Kafka")
        data += chunk
    return data


def broker_ready(port: int, host: str = "127.0.0.1", timeout_s: float = 3.0) -> bool:
    """True once the broker serves requests and lists itself in a metadata response.

    An open port is not enough: a KRaft broker accepts connections before it has caught up with the
    metadata log. Two small protocol requests avoid starting a whole client for this check.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        body = _request(sock, _API_VERSIONS, 0, b"", 1)
        error, count = struct.unpack(">hi", body[:6])
        if error != 0:
            return False
        versions = {}
        for i in range(count):
            key, low, high = struct.unpack(">hhh", body[6 + 6 * i : 12 + 6 * i])
            versions[key] = (low, high)
        low, high = versions.get(_METADATA, (0, -1))
        if not low <= 4 <= high:
            return True  # a broker without Metadata v4 answered ApiVersions: the best proof available
        # Metadata v4: no topics, no auto-creation; answer = throttle, then the broker list
        body = _request(sock, _METADATA, 4, struct.pack(">ib", 0, 0), 2)
        brokers: int = struct.unpack(">i", body[4:8])[0]
        return brokers >= 1


class EmbeddedKafka(LocalServer):
    name = "kafka"
    what = "Kafka"
    # stop: LocalServer's TERM runs Kafka's controlled shutdown, which flushes logs so the next start
    # skips recovery.
    stop_timeout_s = 45.0

    def __init__(self, settings: Settings, jars: JarDirs) -> None:
        self.settings = settings
        self.jars = jars
        self.port = settings.stack_kafka_port
        self.controller_port = settings.stack_kafka_controller_port
        stack_dir = settings.stack_dir.resolve()
        self.home = stack_dir / "kafka"
        self.data_dir = self.home / "data"
        self.properties = self.home / "server.properties"
        self.log4j = self.home / "log4j2.properties"
        self.cluster_id_file = self.home / "cluster.id"
        self.log_file = stack_dir / "logs" / "kafka.log"
        self.pid_file = stack_dir / "run" / "kafka.pid"

    def _write_config(self) -> None:
        write_properties(
            self.properties,
            {
                "process.roles": "broker,controller",
                "node.id": 1,
                "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
                "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names": "CONTROLLER",
                "inter.broker.listener.name": "PLAINTEXT",
                "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                "log.dirs": self.data_dir,
                "num.partitions": self.settings.stack_topic_partitions,
                "default.replication.factor": 1,
                "min.insync.replicas": 1,
                "offsets.topic.replication.factor": 1,
                "transaction.state.log.replication.factor": 1,
                "transaction.state.log.min.isr": 1,
                "share.coordinator.state.topic.replication.factor": 1,
                "share.coordinator.state.topic.min.isr": 1,
                # Topics are made by whoever knows their settings: Debezium (topic.creation.*) and the
                # consumer (retry, dead letters). A subscription would otherwise create the source topic
                # with these defaults before Debezium's settings apply.
                "auto.create.topics.enable": False,
                # consumers in tests and the demo join at once instead of waiting 3 s for more members
                "group.initial.rebalance.delay.ms": 0,
            },
            header="single-node KRaft broker of the cdc-embedder local stack",
        )
        self.log4j.write_text(LOG4J2_CONSOLE)

    def _format_storage(self, progress: Progress) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        if not self.cluster_id_file.exists():
            self.cluster_id_file.write_text(_new_cluster_id() + "\n")
        cluster_id = self.cluster_id_file.read_text().strip()
        progress(f"kafka: formatting storage in {self.data_dir} (cluster id {cluster_id})")
        argv = java_command(
            classpath_dirs=[self.jars.kafka],
            main_class=STORAGE_TOOL,
            args=["format", "-t", cluster_id, "-c", str(self.properties), "--ignore-formatted"],
            heap="256m",
            log4j_config=self.log4j,
        )
        with self.log_file.open("ab") as log:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=False
            )
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{log_tail(self.log_file, 20)}")

    def _marker(self) -> str:
        return str(self.properties)

    def _ports(self) -> list[tuple[int, str, str]]:
        return [
            (self.port, "the embedded Kafka", env_name("stack_kafka_port")),
            (self.controller_port, "the Kafka controller", env_name("stack_kafka_controller_port")),
        ]

    def _status_details(self) -> dict[str, object]:
        return {"url": f"127.0.0.1:{self.port}", "data": str(self.data_dir)}

    def start(self, progress: Progress = silent, timeout_s: float = 120.0) -> None:
        if not self._should_start(progress):
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(progress)
        argv = java_command(
            classpath_dirs=[self.jars.kafka],
            main_class=MAIN_CLASS,
            args=[str(self.properties)],
            log4j_config=self.log4j,
        )
        pid = start_detached(argv, log_file=self.log_file, pid_file=self.pid_file, cwd=self.home)
        progress(f"kafka: started (pid {pid}), waiting for the broker ...")
        wait_until(
            lambda: broker_ready(self.port),
            what="Kafka",
            timeout_s=timeout_s,
            log_file=self.log_file,
            pid=pid,
        )
        progress(f"kafka: ready on 127.0.0.1:{self.port} (controller {self.controller_port})")

    def restart(self, progress: Progress = silent) -> None:
        self.stop(progress)
        self.start(progress)
