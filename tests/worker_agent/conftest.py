"""Fixtures for the worker agent: real coordinators, backends, a router stand-in and a failover
front on loopback, and the fake ``cloudflared`` executable. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from coordinator.app import COORDINATOR, Coordinator, create_app
from coordinator.frontdoor import FrontRunner
from coordinator.protocol import (
    EdgeHeartbeatRequest,
    EdgeRegisterRequest,
    HealthResponse,
)
from coordinator.settings import CoordinatorSettings
from worker_agent.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
FAKE_CLOUDFLARED = ROOT / "tests" / "fake_cloudflared"
VENV_BIN = Path(sys.executable).parent
ENV_NAMES = [n.upper() for n in WorkerSettings.model_fields] + [
    n.upper() for n in CoordinatorSettings.model_fields
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the developer's shell; the fake cloudflared finds aiohttp."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("FAKE_CLOUDFLARED_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_settings(tmp_path: Path, **overrides: Any) -> WorkerSettings:
    """Worker settings with the fake cloudflared and short timings."""
    base: dict[str, Any] = {
        "state_dir": tmp_path / "agent-state",
        "coordinator_url": "http://127.0.0.1:9",
        "gateway_port": 0,
        "cloudflared_path": str(FAKE_CLOUDFLARED),
        "cloudflared_download": False,
        "auto_detect": False,
        "http_timeout": 2.0,
        "register_backoff_initial": 0.05,
        "register_backoff_max": 0.2,
        "heartbeat_min_interval": 0.05,
        "backend_check_interval": 0.2,
        "backend_probe_timeout": 1.0,
        "tunnel_start_timeout": 10.0,
        "tunnel_check_interval": 0.2,
        "tunnel_ready_failures": 2,
        "tunnel_backoff_initial": 0.05,
        "tunnel_backoff_max": 0.5,
        "tunnel_stop_timeout": 3.0,
        "drain_timeout": 5.0,
        "log_level": "warning",
    }
    base.update(overrides)
    return WorkerSettings(**base)


def agent_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of an ``rma-worker`` subprocess, with the same short timings."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in ENV_NAMES}
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "STATE_DIR": str(tmp_path / "agent-state"),
            "GATEWAY_PORT": "0",
            "CLOUDFLARED_PATH": str(FAKE_CLOUDFLARED),
            "CLOUDFLARED_DOWNLOAD": "false",
            "AUTO_DETECT": "false",
            "HTTP_TIMEOUT": "2",
            "REGISTER_BACKOFF_INITIAL": "0.05",
            "REGISTER_BACKOFF_MAX": "0.2",
            "HEARTBEAT_MIN_INTERVAL": "0.05",
            "BACKEND_CHECK_INTERVAL": "0.2",
            "TUNNEL_CHECK_INTERVAL": "0.2",
            "TUNNEL_BACKOFF_INITIAL": "0.05",
            "TUNNEL_BACKOFF_MAX": "0.5",
            "DRAIN_TIMEOUT": "5",
            "LOG_FORMAT": "json",
        }
    )
    env.update(overrides)
    return env


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02
) -> float:
    """Seconds it took ``predicate`` to hold; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


# ------------------------------------------------------------------------------ coordinators


def coordinator_settings(tmp_path: Path, **overrides: Any) -> CoordinatorSettings:
    base: dict[str, Any] = {
        "dev_allow_loopback": True,
        "coordinator_state_dir": tmp_path / "coord-state",
        "heartbeat_interval": 0.3,
        "sweep_interval": 0.05,
        "proxy_connect_timeout": 1.0,
        "proxy_ttfb_timeout": 5.0,
        "catalog_allow_unlisted": True,
        "log_level": "warning",
    }
    base.update(overrides)
    return CoordinatorSettings(**base)


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@dataclass
class CoordinatorServer:
    """A real coordinator on a fixed loopback port that can be stopped and started again."""

    tmp_path: Path
    coordinator_id: str
    overrides: dict[str, Any]
    advertise_self: bool = False
    port: int = 0
    runner: web.AppRunner | None = None
    app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def coordinator(self) -> Coordinator:
        assert self.app is not None
        return self.app[COORDINATOR]

    async def start(self) -> CoordinatorServer:
        sock = _listen(self.port)
        self.port = int(sock.getsockname()[1])
        overrides = dict(self.overrides)
        if self.advertise_self:
            overrides["coordinator_public_url"] = self.url
        self.app = create_app(
            coordinator_settings(self.tmp_path, **overrides), coordinator_id=self.coordinator_id
        )
        self.runner = FrontRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def coordinator_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[CoordinatorServer]]]:
    servers: list[CoordinatorServer] = []

    async def factory(
        coordinator_id: str = "coord-test", advertise_self: bool = False, **overrides: Any
    ) -> CoordinatorServer:
        server = CoordinatorServer(tmp_path, coordinator_id, overrides, advertise_self)
        servers.append(server)
        return await server.start()

    yield factory
    for server in servers:
        await server.stop()


# ------------------------------------------------------------------------------ backends


@dataclass
class Site:
    runner: web.AppRunner
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_site(app: web.Application, port: int = 0) -> Site:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Site(runner)


def stream_backend_app(seen: list[dict[str, Any]]) -> web.Application:
    """A backend with an SSE route (``/stream?n=&gap=``), a slow one, and a JSON echo."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "headers": request.headers.copy(),
                "body": body,
            }
        )
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(int(request.query.get("n", "3"))):
                await resp.write(f"data: token-{i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("gap", "0.2")))
            await resp.write_eof()
            return resp
        if request.path == "/slow":
            await asyncio.sleep(float(request.query.get("s", "1")))
        if request.path == "/gzip":
            return web.Response(
                body=b"\x1f\x8b-not-really-gzip",
                headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
            )
        return web.json_response(
            {"path": request.path, "query": request.query_string, "body_bytes": len(body)},
            headers={"X-Backend": "stream", "Connection": "keep-alive, X-Hop", "X-Hop": "1"},
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def site_factory() -> AsyncIterator[Callable[..., Awaitable[Site]]]:
    sites: list[Site] = []

    async def factory(app: web.Application | None = None, port: int = 0) -> Site:
        seen: list[dict[str, Any]] = []
        site = await start_site(app or stream_backend_app(seen), port)
        site.seen = seen
        sites.append(site)
        return site

    yield factory
    for site in sites:
        await site.runner.cleanup()


# ------------------------------------------------------------------------------ failover front


def failover_front_app(targets: list[str]) -> web.Application:
    """One URL in front of several coordinators: forwards to the first one that answers."""
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=0.5)
        )

    async def on_cleanup(app: web.Application) -> None:
        await state["session"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        for target in targets:
            try:
                async with state["session"].request(
                    request.method, target + request.raw_path, data=body, headers=headers
                ) as resp:
                    payload = await resp.read()
                    return web.Response(
                        status=resp.status,
                        body=payload,
                        content_type=resp.content_type,
                    )
            except aiohttp.ClientConnectionError:
                continue
        return web.json_response({"error": "no_coordinator", "detail": None}, status=502)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# ------------------------------------------------------------------------------ router stand-in


@dataclass
class RouterState:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def router_app(state: RouterState, join_token: str | None = None) -> web.Application:
    """The router's edge API as the architecture specifies it, on loopback.

    Registration checks that ``GET <tunnel_url>/health`` names the same coordinator (so nobody can
    register someone else's URL) and returns a per-coordinator secret, which alone may heartbeat
    or delete that id. Unknown ids get 404.
    """
    session: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def on_cleanup(app: web.Application) -> None:
        await session["s"].close()

    def error(status: int, code: str) -> web.Response:
        return web.json_response({"error": code, "detail": None, "hop": "router"}, status=status)

    def bearer(request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ").strip()

    async def register(request: web.Request) -> web.Response:
        if join_token is not None and bearer(request) != join_token:
            return error(401, "unauthorized")
        req = EdgeRegisterRequest.model_validate_json(await request.read())
        row = state.rows.get(req.coordinator_id)
        if row is not None and req.coordinator_secret != row["secret"]:
            return error(403, "forbidden")
        async with session["s"].get(f"{req.tunnel_url}/health") as resp:
            health = HealthResponse.model_validate_json(await resp.read())
        if health.coordinator_id != req.coordinator_id:
            return error(422, "coordinator_id_mismatch")
        # A new id keeps the secret its coordinator proposes (as the real router does).
        fresh = f"secret-{len(state.registrations):04d}-0123456789"
        secret = row["secret"] if row else (req.coordinator_secret or fresh)
        state.rows[req.coordinator_id] = {"secret": secret, "tunnel_url": req.tunnel_url}
        state.registrations.append(req.model_dump())
        return web.json_response(
            {
                "coordinator_id": req.coordinator_id,
                "coordinator_secret": secret,
                "heartbeat_interval": 0.2,
            }
        )

    async def heartbeat(request: web.Request) -> web.Response:
        beat = EdgeHeartbeatRequest.model_validate_json(await request.read())
        row = state.rows.get(beat.coordinator_id)
        if row is None:
            return error(404, "unknown_coordinator")
        if bearer(request) != row["secret"]:
            return error(401, "unauthorized")
        state.heartbeats.append(beat.model_dump())
        return web.json_response({"ok": True})

    async def delete(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        row = state.rows.get(cid)
        if row is None:
            return error(404, "unknown_coordinator")
        if bearer(request) != row["secret"]:
            return error(401, "unauthorized")
        del state.rows[cid]
        state.deleted.append(cid)
        return web.json_response({"removed": cid})

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/api/edge/register", register)
    app.router.add_post("/api/edge/heartbeat", heartbeat)
    app.router.add_delete("/api/edge/{cid}", delete)
    return app


# ------------------------------------------------------------------------------ processes


def pids_in(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text(encoding="utf-8").split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@pytest.fixture
def reap() -> Any:
    """Stop, by pid, every process a test registered here (if the test did not)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def read_json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


@pytest.fixture
def cf_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake cloudflared's state directory; every fake still alive at the end is killed."""
    state = tmp_path / "cf"
    state.mkdir()
    monkeypatch.setenv("FAKE_CLOUDFLARED_STATE", str(state))
    yield state
    for pid in pids_in(state / "starts"):
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def agents(cf_state: Path) -> AsyncIterator[list[Any]]:
    """Agents (or edge agents) a test started; each is shut down at the end."""
    started: list[Any] = []
    yield started
    for agent in reversed(started):
        agent.abandon_drain()
        await agent.shutdown()
