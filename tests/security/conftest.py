"""Hostile-input fixtures: a real coordinator with an admin token, a real worker gateway registered
behind it, and helpers that read the coordinator's state back through ``GET /api/workers``.

Everything listens on 127.0.0.1; every server a test starts is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from coordinator.app import COORDINATOR, Coordinator, create_app
from coordinator.frontdoor import FrontRunner
from tests.worker_agent.conftest import agent_settings, coordinator_settings
from worker_agent.backends import Backends
from worker_agent.gateway import Gateway

ADMIN = "admin-token-for-the-security-suite-0123"
GATEWAY_KEY = "gateway-key-for-the-security-suite-0123"


def register_body(tunnel_url: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "worker_type": "cpu",
        "tunnel_url": tunnel_url,
        "gateway_key": GATEWAY_KEY,
        "services": [{"name": "echo"}],
        "capabilities": {"cpu_cores": 2, "ram_total_mb": 4096},
    }
    body.update(extra)
    return body


@dataclass
class Federation:
    """One coordinator and one registered worker (a real gateway serving ``echo``)."""

    coordinator: Coordinator
    url: str
    gateway: Gateway
    worker: dict[str, Any]  # the registration reply of the legitimate worker
    runner: web.AppRunner
    extra: list[Any] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    async def snapshot(self, http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        """Every worker the coordinator knows, as the admin sees it (by id)."""
        async with http.get(
            f"{self.url}/api/workers", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            data = await resp.json()
        return {w["worker_id"]: w for w in data["workers"]}


async def start_federation(tmp_path: Path, *, front: bool = False, **overrides: Any) -> Federation:
    """A federation on loopback; ``front``: behind the front door, as ``rma-coordinator`` serves."""
    settings = coordinator_settings(
        tmp_path,
        admin_token=ADMIN,
        heartbeat_interval=30.0,
        client_read_timeout=1.0,
        **overrides,
    )
    app = create_app(settings, coordinator_id="coord-sec")
    runner_type = FrontRunner if front else web.AppRunner
    runner = runner_type(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    wsettings = agent_settings(tmp_path, gateway_read_timeout=1.0)
    gateway = Gateway(wsettings, Backends(wsettings), GATEWAY_KEY, lambda: "w-legit")
    gateway.assigned = frozenset({"echo"})
    await gateway.start("127.0.0.1", 0)
    join = overrides.get("worker_join_token")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/worker/register",
            json=register_body(f"http://127.0.0.1:{gateway.port}", worker_id="w-legit"),
            headers={"Authorization": f"Bearer {join}"} if join else None,
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        worker = await resp.json()
    return Federation(app[COORDINATOR], url, gateway, worker, runner)


async def stop_federation(fed: Federation) -> None:
    await fed.runner.cleanup()
    await fed.gateway.close()


#: Both servers: aiohttp alone, and behind the front door (which serves some routes itself).
SERVERS = pytest.fixture(params=["aiohttp", "front-door"])


@SERVERS
def front(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "front-door")


@pytest.fixture
async def fed(tmp_path: Path, front: bool) -> AsyncIterator[Federation]:
    federation = await start_federation(tmp_path, front=front)
    yield federation
    await stop_federation(federation)


@pytest.fixture
async def fed_factory(
    tmp_path: Path, front: bool
) -> AsyncIterator[Callable[..., Awaitable[Federation]]]:
    made: list[Federation] = []

    async def factory(**overrides: Any) -> Federation:
        sub = tmp_path / f"fed{len(made)}"
        sub.mkdir()
        federation = await start_federation(sub, front=front, **overrides)
        made.append(federation)
        return federation

    yield factory
    for federation in made:
        await stop_federation(federation)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


class ThreadedFederation:
    """A federation on its own event loop in a thread, for synchronous clients (schemathesis)."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fed: Federation = self.run(start_federation(tmp_path, **overrides))

    def run(self, coro: Awaitable[Any]) -> Any:
        async def wrap() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout=30)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        async def read() -> dict[str, dict[str, Any]]:
            async with aiohttp.ClientSession() as session:
                return await self.fed.snapshot(session)

        result: dict[str, dict[str, Any]] = self.run(read())
        return result

    def close(self) -> None:
        try:
            self.run(stop_federation(self.fed))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def threaded_fed(tmp_path: Path) -> Iterator[ThreadedFederation]:
    federation = ThreadedFederation(tmp_path)
    yield federation
    federation.close()
