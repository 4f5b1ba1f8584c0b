"""`cdc-embedder stack up|down|status`: Postgres, Kafka and Kafka Connect on this machine, without Docker."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import psycopg
from psycopg import sql

from consumer.settings import Settings, env_name
from consumer.stack.connect import LocalConnect
from consumer.stack.kafka import EmbeddedKafka
from consumer.stack.maven import JarDirs, jar_dirs, resolve_jars
from consumer.stack.postgres import EmbeddedPostgres
from consumer.stack.process import Progress, StackError, silent

# Names Debezium uses on the source database (see connectors/documents.json); an external database
# keeps them after the stack is gone, and a forgotten slot retains WAL forever.
SLOT_NAME = "cdc_embedder"
PUBLICATION_NAME = "cdc_embedder"


class LocalStack:
    """The local stack under `settings.stack_dir`; every method is safe to call in any state."""

    def __init__(self, settings: Settings, *, pom_root: Path | None = None) -> None:
        self.settings = settings
        self.stack_dir = settings.stack_dir.resolve()
        self.pom_root = pom_root
        self.jars: JarDirs = jar_dirs(self.stack_dir)
        self._postgres: EmbeddedPostgres | None = None
        self._vector_postgres: EmbeddedPostgres | None = None
        self.kafka = EmbeddedKafka(settings, self.jars)
        self.connect = LocalConnect(settings, self.jars)

    @property
    def postgres(self) -> EmbeddedPostgres:
        return self._pg()

    def _pg(self, progress: Progress = silent) -> EmbeddedPostgres:
        # Created on first use: as root it may create the service account, which `status` must not do
        # on a machine that never ran the stack.
        if self._postgres is None:
            self._postgres = EmbeddedPostgres(self.settings, progress)
        return self._postgres

    @property
    def starts_vector_database(self) -> bool:
        """CDC_STACK_VECTOR_DATABASE: a second embedded Postgres holds the vector tables."""
        s = self.settings
        return s.stack_vector_database and s.uses_embedded_postgres and s.vector_database_url is None

    @property
    def vector_postgres(self) -> EmbeddedPostgres:
        return self._vector_pg()

    def _vector_pg(self, progress: Progress = silent) -> EmbeddedPostgres:
        if self._vector_postgres is None:
            self._vector_postgres = EmbeddedPostgres(self.settings, progress, vectors=True)
        return self._vector_postgres

    # --- up --------------------------------------------------------------------------------------
    def resolve_jars(self, progress: Progress = silent) -> JarDirs:
        return resolve_jars(self.stack_dir, pom_root=self.pom_root, progress=progress)

    def up(self, progress: Progress = silent) -> None:
        """Start whatever is not running yet and wait until each part is healthy."""
        started = time.monotonic()
        for folder in ("logs", "run"):
            (self.stack_dir / folder).mkdir(parents=True, exist_ok=True)
        self.resolve_jars(progress)
        if self.settings.uses_embedded_postgres:
            self._pg(progress).start(progress)
            if self.starts_vector_database:
                self._vector_pg(progress).start(progress)
        else:
            progress(f"postgres: external ({self.settings.redacted_dsn()}), not started here")
        if self.settings.uses_embedded_kafka:
            self.kafka.start(progress)
        else:
            progress(f"kafka: external ({self.settings.bootstrap_servers}), not started here")
        if self.settings.connect_url is None:
            self.connect.start(progress)
        else:
            progress(f"connect: external ({self.settings.connect_rest_url}), not started here")
        progress(f"stack: up in {time.monotonic() - started:.1f} s (logs in {self.stack_dir / 'logs'})")

    # --- down ------------------------------------------------------------------------------------
    def down(self, purge: bool = False, progress: Progress = silent) -> None:
        """Stop Connect, Kafka, Postgres (in that order); `purge` also forgets all state but the jars."""
        if purge and self.connect.is_running():
            # Connect's own state lives in Kafka; on an external Kafka it would outlive the purge.
            from consumer.connectors import delete_connector

            with contextlib.suppress(Exception):
                if delete_connector(self.settings, base_url=self.connect.url):
                    progress("connect: connector deleted")
        self.connect.stop(progress)
        self.kafka.stop(progress)
        if self.settings.uses_embedded_postgres:
            self.postgres.stop(progress)
            if self.starts_vector_database or self._vector_state_exists():
                self._vector_pg(progress).stop(progress)
        leftovers = [c.name for c in self._components() if c.pid() is not None]
        if leftovers:
            raise StackError(
                f"still running after stop: {', '.join(leftovers)}; see {self.stack_dir / 'logs'}"
            )
        if not purge:
            progress("stack: stopped; data kept, `stack up` resumes")
            return
        if not self.settings.uses_embedded_postgres:
            self._drop_external_replication(progress)
        self.connect.purge()
        self.kafka.purge()
        if self.settings.uses_embedded_postgres:
            # may live outside stack_dir (see EmbeddedPostgres), so removing stack_dir is not enough
            self.postgres.purge()
            if self._vector_postgres is not None:
                self._vector_postgres.purge()
        for entry in self.stack_dir.iterdir() if self.stack_dir.exists() else []:
            if entry.name == "jars":
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        progress(f"stack: purged {self.stack_dir} (kept {self.stack_dir / 'jars'})")

    def _postgres_state_exists(self) -> bool:
        return (self.stack_dir / "run" / "postgres.pid").exists() or (self.stack_dir / "postgres").exists()

    def _vector_state_exists(self) -> bool:
        name = "postgres-vectors"
        return (self.stack_dir / "run" / f"{name}.pid").exists() or (self.stack_dir / name).exists()

    def _components(self) -> list[EmbeddedPostgres | EmbeddedKafka | LocalConnect]:
        components: list[EmbeddedPostgres | EmbeddedKafka | LocalConnect] = [self.connect, self.kafka]
        components += [pg for pg in (self._postgres, self._vector_postgres) if pg is not None]
        return components

    def _drop_external_replication(self, progress: Progress) -> None:
        try:
            with psycopg.connect(self.settings.dsn, autocommit=True, connect_timeout=10) as conn:
                # The slot stays "active" for a moment after Connect exits, until the walsender notices.
                deadline = time.monotonic() + 30
                while True:
                    row = conn.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT_NAME,)
                    ).fetchone()
                    if row is None:
                        break
                    if not row[0]:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT_NAME,))
                        progress(f"postgres: dropped replication slot {SLOT_NAME}")
                        break
                    if time.monotonic() > deadline:
                        raise StackError(f"replication slot {SLOT_NAME} is still in use by another client")
                    time.sleep(1)
                conn.execute(
                    sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION_NAME))
                )
        except psycopg.Error as exc:
            raise StackError(
                f"could not drop replication slot {SLOT_NAME} on {self.settings.redacted_dsn()}: {exc}; "
                f"check {env_name('database_url')}, or drop it by hand: "
                f"SELECT pg_drop_replication_slot('{SLOT_NAME}')"
            ) from exc

    # --- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, dict[str, object]]:
        result: dict[str, dict[str, object]] = {}
        if self.settings.uses_embedded_postgres:
            result["postgres"] = self.postgres.status() if self._postgres_state_exists() else {
                "running": False, "pid": None, "port": self.settings.stack_pg_port,
                "url": self.settings.redacted_dsn(), "log": str(self.stack_dir / "logs" / "postgres.log"),
            }  # fmt: skip
        else:
            result["postgres"] = {
                "running": None,
                "pid": None,
                "url": self.settings.redacted_dsn(),
                "external": True,
            }
        if self.starts_vector_database:
            result["postgres-vectors"] = self._vector_pg().status()
        if self.settings.uses_embedded_kafka:
            result["kafka"] = self.kafka.status()
        else:
            result["kafka"] = {
                "running": None,
                "pid": None,
                "url": self.settings.bootstrap_servers,
                "external": True,
            }
        result["connect"] = self.connect.status()
        result["jars"] = {
            "running": None,
            "resolved": self.jars.all_resolved(),
            "path": str(self.stack_dir / "jars"),
        }
        return result
