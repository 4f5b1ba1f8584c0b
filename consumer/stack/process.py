"""Process helpers shared by the local stack: detached start, pid files, readiness waits, TERM then KILL,
and `LocalServer`, the lifecycle every server of the stack has in common.

The stack's servers must outlive the `cdc-embedder stack up` command that started them, so each runs in
its own session with its output appended to a log file, and is found again later through a pid file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from consumer.errors import OperatorError

Progress = Callable[[str], None]


def silent(_: str) -> None:
    """A progress sink for callers that want no output."""


class StackError(OperatorError):
    """The local stack could not do what was asked; the message says what to change or install."""


def require_tool(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StackError(f"`{name}` not found on PATH: {install_hint}")
    return path


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().split()
    except (FileNotFoundError, PermissionError):
        return None
    if not text or not text[0].isdigit():
        return None
    return int(text[0])


def pid_alive(pid: int) -> bool:
    # A server we started in this very process lingers as a zombie after it exits until it is reaped,
    # and a zombie still "exists" for kill(pid, 0): reap it first so a dead server reads as dead.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def owned_pid(pid_file: Path, marker: str) -> int | None:
    """The live pid from `pid_file`, if its command line still contains `marker`.

    Pid files outlive reboots and pids get reused; without the marker check a stale file could make
    `down` signal an unrelated process.
    """
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid) or marker not in cmdline(pid):
        return None
    return pid


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def log_tail(log_file: Path, lines: int = 30) -> str:
    try:
        with log_file.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def appending_log(log_file: Path, banner: str) -> Iterator[BinaryIO]:
    """Open `log_file` for appending (creating its folder), after a line that marks where this run begins."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')} {banner}\n".encode())
        log.flush()
        yield log


def start_detached(
    argv: Sequence[str],
    *,
    log_file: Path,
    pid_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    run_as: tuple[int, int] | None = None,
) -> int:
    """Start `argv` in a new session, stdout and stderr appended to `log_file`; return its pid.

    `run_as` is (uid, gid): the log file is opened here, so the server needs no access to the log folder.
    """
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with appending_log(log_file, f"starting: {argv[-1]}") as log:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                user=run_as[0] if run_as else None,
                group=run_as[1] if run_as else None,
                # root's supplementary groups must not leak into an unprivileged server
                extra_groups=[] if run_as else None,
            )
        except FileNotFoundError as exc:
            raise StackError(f"cannot run {argv[0]}: {exc}") from exc
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    log_file: Path | None = None,
    pid: int | None = None,
    interval_s: float = 0.5,
) -> None:
    """Poll `ready` until it is true; fail early, with the log's tail, when the process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            if ready():
                return
        tail = f"\nlast lines of {log_file}:\n{log_tail(log_file)}" if log_file else ""
        if pid is not None and not pid_alive(pid):
            raise StackError(f"{what} exited while starting (pid {pid}){tail}")
        if time.monotonic() >= deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s{tail}")
        time.sleep(interval_s)


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    # Servers run as session leaders, so signalling the group also reaches helper children they forked.
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_pid(
    pid: int,
    *,
    what: str,
    term_timeout_s: float = 30.0,
    first: signal.Signals = signal.SIGTERM,
    first_to_group: bool = True,
) -> None:
    """Ask politely (`first`, TERM by default), then KILL; raise if the process still exists after that."""
    if not pid_alive(pid):
        return
    _signal(pid, first, first_to_group)
    if wait_gone(pid, term_timeout_s):
        return
    _signal(pid, signal.SIGKILL, True)
    if not wait_gone(pid, 10.0):
        raise StackError(f"{what} (pid {pid}) survived SIGKILL")


def free_port_or_fail(port: int, *, what: str, setting: str) -> None:
    if port_open(port):
        raise StackError(
            f"port {port} for {what} is taken by another program: stop it or set {setting} to a free port"
        )


class LocalServer(ABC):
    """What the stack's servers share: a pid file, a port, a log, a home folder, and start/stop around them.

    A subclass sets the attributes below and supplies its marker, its ports and its own `start`; the pid
    file ownership, "already running", stop and status live here once.
    """

    name: str  # the prefix of progress lines and the key in `stack status`
    what: str  # how errors name the server
    port: int
    home: Path
    log_file: Path
    pid_file: Path
    stop_timeout_s = 30.0
    stop_signal = signal.SIGTERM
    stop_signal_to_group = True

    @abstractmethod
    def _marker(self) -> str:
        """Text in this server's command line that tells it apart from whatever reuses its pid."""

    @abstractmethod
    def _ports(self) -> list[tuple[int, str, str]]:
        """(port, what listens there, the setting that moves it) for every port the server binds."""

    def _location(self) -> str:
        return f"on 127.0.0.1:{self.port}"

    def _status_details(self) -> dict[str, object]:
        return {}

    def pid(self) -> int | None:
        return owned_pid(self.pid_file, self._marker())

    def is_running(self) -> bool:
        return self.pid() is not None and port_open(self.port)

    def _should_start(self, progress: Progress) -> bool:
        """The start preamble: False when already running, else fail unless every port is free."""
        if self.is_running():
            progress(f"{self.name}: already running {self._location()} (pid {self.pid()})")
            return False
        for port, what, setting in self._ports():
            free_port_or_fail(port, what=what, setting=setting)
        return True

    def stop(self, progress: Progress = silent, timeout_s: float | None = None) -> None:
        pid = self.pid()
        if pid is not None:
            progress(f"{self.name}: stopping (pid {pid})")
            stop_pid(
                pid,
                what=self.what,
                term_timeout_s=self.stop_timeout_s if timeout_s is None else timeout_s,
                first=self.stop_signal,
                first_to_group=self.stop_signal_to_group,
            )
        self.pid_file.unlink(missing_ok=True)

    def purge(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def status(self) -> dict[str, object]:
        pid = self.pid()
        return {
            "running": pid is not None and port_open(self.port),
            "pid": pid,
            "port": self.port,
            **self._status_details(),
            "log": str(self.log_file),
        }


def java_command(
    *,
    classpath_dirs: Sequence[Path],
    main_class: str,
    args: Sequence[str],
    heap: str = "512m",
    log4j_config: Path | None = None,
    system_properties: Mapping[str, str] | None = None,
) -> list[str]:
    java = require_tool(
        "java",
        "install a JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless) or put it on PATH",
    )
    argv = [
        java,
        f"-Xmx{heap}",
        "-Xms128m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
    ]
    if log4j_config is not None:
        argv.append(f"-Dlog4j2.configurationFile={log4j_config}")
    for key, value in (system_properties or {}).items():
        argv.append(f"-D{key}={value}")
    argv += ["-cp", os.pathsep.join(f"{d}/*" for d in classpath_dirs), main_class, *args]
    return argv


def write_properties(path: Path, values: Mapping[str, object], *, header: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {header}", "# Written by cdc-embedder on every start; edits are overwritten."]
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"{key}={text}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(mode)


LOG4J2_CONSOLE = """\
# Everything goes to stdout, which the stack redirects into this service's log file.
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
logger.jetty.name = org.eclipse.jetty
logger.jetty.level = WARN
"""
