"""Shared fixtures: a real coordinator on loopback and real aiohttp backends posing as workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from coordinator.app import COORDINATOR, Coordinator, create_app
from coordinator.frontdoor import FrontRunner
from coordinator.protocol import GATEWAY_KEY_HEADER, REQUEST_ID_HEADER
from coordinator.settings import CoordinatorSettings

GATEWAY_KEY = "gateway-key-for-tests-0123456789"


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Run every async test on uvloop, the loop the coordinator and agent use in production."""
    return {"uvloop": uvloop.new_event_loop}


def make_settings(tmp_path: Path, **overrides: Any) -> CoordinatorSettings:
    base: dict[str, Any] = {
        "dev_allow_loopback": True,
        "coordinator_state_dir": tmp_path / "state",
        "heartbeat_interval": 5.0,
        "sweep_interval": 0.05,
        "proxy_connect_timeout": 1.0,
        "proxy_ttfb_timeout": 5.0,
        "log_level": "warning",
    }
    base.update(overrides)
    return CoordinatorSettings(**base)


@dataclass
class Backend:
    """A worker gateway stand-in: a real aiohttp server that records what reached it."""

    server: TestServer
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


def backend_app(seen: list[dict[str, Any]], name: str = "backend") -> web.Application:
    async def service(request: web.Request) -> web.StreamResponse:
        if request.headers.get(GATEWAY_KEY_HEADER) != GATEWAY_KEY:
            return web.json_response({"error": "unauthorized"}, status=401)
        tail = request.match_info["tail"]
        body = await request.read()
        record = {
            "backend": name,
            "method": request.method,
            "service": request.match_info["name"],
            "raw_path": request.raw_path,
            "tail": tail,
            "headers": request.headers.copy(),
            "body": body,
        }
        seen.append(record)
        if tail == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(int(request.query.get("n", "3"))):
                await resp.write(f"data: token-{i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("gap", "0.2")))
            await resp.write_eof()
            return resp
        if tail == "die-mid-stream":
            resp = web.StreamResponse(
                headers={"Content-Type": request.query.get("ct", "text/event-stream")}
            )
            await resp.prepare(request)
            await resp.write(b"data: first\n\n")
            await asyncio.sleep(0.1)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if tail == "slow":
            await asyncio.sleep(float(request.query.get("s", "1")))
        if tail == "status":
            return web.json_response(
                {"error": "backend says no"}, status=int(request.query["code"])
            )
        if tail == "big":
            return web.Response(
                body=b"x" * (2 * 1024 * 1024), content_type="application/octet-stream"
            )
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "tail": tail,
                "query": request.query_string,
                "body_bytes": len(body),
                "model": json.loads(body).get("model") if body.startswith(b"{") else None,
            },
            headers={
                "X-Backend": name,
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
            },
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/service/{name}/{tail:.*}", service)
    return app


BackendFactory = Callable[..., Awaitable[Backend]]


@pytest.fixture
async def backend_factory() -> Any:
    servers: list[TestServer] = []

    async def factory(name: str = "backend") -> Backend:
        seen: list[dict[str, Any]] = []
        server = TestServer(backend_app(seen, name), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Backend(server, seen)

    yield factory
    for server in servers:
        await server.close()


@dataclass
class Fed:
    """A coordinator under test with helpers to register workers against it."""

    client: TestClient[web.Request, web.Application]
    coordinator: Coordinator

    async def register(
        self,
        url: str,
        *,
        services: list[dict[str, Any]] | None = None,
        worker_type: str = "cpu",
        gpus: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "worker_type": worker_type,
            "tunnel_url": url,
            "gateway_key": GATEWAY_KEY,
            "services": services or [{"name": "echo"}],
            "capabilities": {"cpu_cores": 4, "ram_total_mb": 16000, "gpus": gpus or []},
        }
        body.update(extra)
        resp = await self.client.post("/api/worker/register", json=body, headers=headers)
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, data
        return data

    async def beat(self, reply: dict[str, Any], **fields: Any) -> Any:
        body = {"worker_id": reply["worker_id"], **fields}
        return await self.client.post(
            "/api/worker/heartbeat",
            json=body,
            headers={"Authorization": f"Bearer {reply['worker_token']}"},
        )


class FrontTestServer(TestServer):
    """A test server with the coordinator's front door, as ``rma-coordinator`` serves."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return FrontRunner(self.app, **kwargs)


@pytest.fixture
def fed_factory(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Awaitable[Fed]]:
    async def factory(**overrides: Any) -> Fed:
        app = create_app(make_settings(tmp_path, **overrides), coordinator_id="coord-test")
        # A new connection per request: each one meets the front door's routing decision
        # (aiohttp closes a connection after the control-plane request handed to it;
        # tests/coordinator/test_frontdoor.py covers keep-alive and that path).
        client = await aiohttp_client(
            FrontTestServer(app, host="127.0.0.1"),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        return Fed(client, app[COORDINATOR])

    return factory


@pytest.fixture
async def fed(fed_factory: Callable[..., Awaitable[Fed]]) -> Fed:
    return await fed_factory()


__all__ = ["GATEWAY_KEY", "REQUEST_ID_HEADER", "Backend", "BackendFactory", "Fed", "make_settings"]
