"""Background processes for the bench: started in their own process group, always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

#: The cores this process may use when the bench starts (before it pins itself).
_CORES = sorted(os.sched_getaffinity(0))
#: Core for load generators and backends, and core for servers under test.
CLIENT_CORE = _CORES[0]
SERVER_CORE = _CORES[1] if len(_CORES) > 1 else _CORES[0]


class BenchError(RuntimeError):
    """A bench step could not run (a process did not start, a check failed)."""


def cores() -> int:
    return len(_CORES)


def can_pin() -> bool:
    return shutil.which("taskset") is not None and cores() >= 2


def pinned(argv: Sequence[str], core: int) -> list[str]:
    """``argv`` prefixed with ``taskset -c <core>`` when pinning is possible."""
    if can_pin():
        return ["taskset", "-c", str(core), *argv]
    return list(argv)


def pin_self(core: int) -> None:
    if can_pin():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


class Proc:
    """A child process in its own session; ``stop()`` ends its whole process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children (nginx workers)."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            procs = [self.ps, *self.ps.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:
            # The leader is gone; make sure nothing else in its group lingers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


class Procs:
    """Every process the bench starts; ``close()`` (or ``with``) stops them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 20.0,
    ) -> Proc:
        proc = Proc(name, argv, log_dir=self.log_dir, env=env)
        self._procs.append(proc)
        if port is not None:
            wait_port(proc, port, ready_timeout)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        while self._procs:
            self._procs.pop().stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited early:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on 127.0.0.1:{port}:\n{proc.log_tail()}")


class CpuMeter:
    """CPU utilisation (share of one core) of a process over a window."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self._cpu = proc.cpu_seconds()
        self._t = time.monotonic()

    def share(self) -> float:
        cpu = self.proc.cpu_seconds() - self._cpu
        wall = time.monotonic() - self._t
        return cpu / wall if wall > 0 else 0.0
