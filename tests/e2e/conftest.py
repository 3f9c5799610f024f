"""The real router (``wrangler dev`` on loopback) for end-to-end tests.

``start_router(tmp_path, **vars)`` starts ``router_worker/node_modules/.bin/wrangler dev`` on
127.0.0.1 with a free port, ``DEV_ALLOW_LOOPBACK=true``, a temporary persist directory and any
other router vars (``HEARTBEAT_INTERVAL_S="0.5"``...), waits for ``GET /health`` and returns a
:class:`Router`; ``Router.stop()`` kills wrangler and its workerd children by process group;
``start_router(tmp_path, port=old.port, **old.vars)`` restarts it on the same port and state.
The ``router_factory`` fixture does the same and stops every router it started.

When ``router_worker/node_modules`` is missing (``make router-deps`` installs it), tests that
need the router are skipped with that reason, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import wrangler

ROOT = Path(__file__).resolve().parents[2]
ROUTER_DIR = wrangler.ROUTER_DIR
WRANGLER = wrangler.WRANGLER
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_router() -> None:
    """Skip (or, under CI, fail) when the router's node_modules are not installed."""
    if WRANGLER.exists():
        return
    reason = f"{WRANGLER.relative_to(ROOT)} is missing: run `make router-deps` (npm ci)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Router:
    """A running ``wrangler dev``: ``url``, ``pid`` (its process group), ``log`` file."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    vars: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get_json(self, path: str, token: str | None = None) -> Any:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        """Kill wrangler and its workerd children (one process group), then reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # workerd children leave the group a moment later
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""


def start_router(tmp_path: Path, port: int | None = None, **router_vars: str) -> Router:
    """Start the real router under ``wrangler dev`` on loopback and wait for ``/health``.

    With ``port`` (a stopped router's), the new one listens there and reuses its persist
    directory, so the Durable Object reloads its SQLite state (a router restart).
    """
    require_router()
    port = port or free_port()
    values = {"DEV_ALLOW_LOOPBACK": "true", **{k: str(v) for k, v in router_vars.items()}}
    work = tmp_path / f"router-{port}"
    work.mkdir(parents=True, exist_ok=True)
    cmd = wrangler.dev_command(port, work, values)
    env = {**os.environ, **wrangler.dev_environment(work)}
    log = work / "wrangler.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROUTER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    router = Router(f"http://127.0.0.1:{port}", port, proc, log, values)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            router.stop()
            raise RuntimeError(f"wrangler dev exited ({proc.returncode}):\n{router.tail()}")
        try:
            if router.get_json("/health").get("status") == "ok":
                return router
        except (OSError, ValueError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            router.stop()
            raise RuntimeError(
                f"wrangler dev did not answer /health in {START_TIMEOUT_S} s:\n{router.tail()}"
            )
        time.sleep(0.2)


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """``router_factory(**vars)`` starts a router; every one is stopped at teardown."""
    started: list[Router] = []

    def factory(**router_vars: str) -> Router:
        router = start_router(tmp_path, **router_vars)
        started.append(router)
        return router

    yield factory
    for router in started:
        router.stop()
