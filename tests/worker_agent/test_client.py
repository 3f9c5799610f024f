"""Control-plane client against a real coordinator, and backoff with jitter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from coordinator.protocol import EdgeRegisterRequest, WorkerHeartbeatRequest, WorkerRegisterRequest
from tests.worker_agent.conftest import (
    CoordinatorServer,
    Site,
    agent_settings,
    free_port,
)
from worker_agent.agent import Agent
from worker_agent.client import ControlClient, Rejected, Unreachable
from worker_agent.retry import retry_forever

CoordinatorFactory = Callable[..., Awaitable[CoordinatorServer]]
SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def client() -> AsyncIterator[ControlClient]:
    async with aiohttp.ClientSession() as session:
        yield ControlClient(session, 2.0)


def register_request(url: str, **extra: Any) -> WorkerRegisterRequest:
    return WorkerRegisterRequest(worker_type="cpu", tunnel_url=url, **extra)


async def test_register_heartbeat_and_refusals(
    client: ControlClient, coordinator_factory: CoordinatorFactory
) -> None:
    coord = await coordinator_factory()
    reply = await client.register(coord.url, register_request("http://127.0.0.1:1"), None)
    assert reply.coordinator_id == "coord-test"
    beat = WorkerHeartbeatRequest(worker_id=reply.worker_id)
    ok = await client.heartbeat(coord.url, beat, reply.worker_token)
    assert ok.state == "active"

    with pytest.raises(Rejected) as info:
        await client.heartbeat(coord.url, beat, "x" * 40)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    with pytest.raises(Rejected) as info:
        await client.heartbeat(
            coord.url, WorkerHeartbeatRequest(worker_id="nobody"), reply.worker_token
        )
    assert (info.value.status, info.value.code) == (404, "unknown_worker")
    with pytest.raises(Rejected) as info:
        await client.register(coord.url, register_request("https://evil.example.com"), None)
    assert (info.value.status, info.value.code) == (422, "invalid_tunnel_url")

    await client.unregister(coord.url, reply.worker_id, reply.worker_token)
    assert coord.coordinator.registry.get(reply.worker_id) is None


async def test_server_errors_bad_replies_and_redirects_are_unreachable(
    client: ControlClient, site_factory: SiteFactory
) -> None:
    seen: list[str] = []

    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "overloaded", "detail": "later"}, status=503)

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>captive portal</html>")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere/api/worker/heartbeat")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/busy/api/worker/register", busy)
    app.router.add_post("/garbage/api/worker/register", garbage)
    app.router.add_post("/redirect/api/worker/heartbeat", redirect)
    app.router.add_post("/elsewhere/api/worker/heartbeat", elsewhere)
    site = await site_factory(app)

    with pytest.raises(Unreachable) as info:
        await client.register(f"{site.url}/busy", register_request("http://127.0.0.1:1"), None)
    assert (info.value.status, info.value.code) == (503, "overloaded")
    with pytest.raises(Unreachable) as info:
        await client.register(f"{site.url}/garbage", register_request("http://127.0.0.1:1"), None)
    assert info.value.code == "bad_reply"
    with pytest.raises(Unreachable) as info:
        await client.heartbeat(
            f"{site.url}/redirect", WorkerHeartbeatRequest(worker_id="w"), "secret-" + "x" * 20
        )
    assert info.value.status == 307
    assert seen == []  # the bearer token never followed the redirect
    with pytest.raises(Unreachable):
        await client.health(f"http://127.0.0.1:{free_port()}")


CLOUDFLARE_PAGE = """<!DOCTYPE html>
<html lang="en-US">
<head>
<title>api.rmatool.org.uk | 502: Bad gateway</title>
<meta charset="UTF-8" />
</head>
<body><div id="cf-error-details">
  <h1>Bad gateway</h1> <span>Error code 502</span>
</div></body></html>
"""


async def test_an_html_error_page_is_reported_by_its_title_on_one_line(
    client: ControlClient, site_factory: SiteFactory
) -> None:
    """A Cloudflare error page (or a proxy's) instead of the JSON contract: the log line names
    the page's title, not 200 bytes of markup with line breaks."""

    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text=CLOUDFLARE_PAGE, content_type="text/html")

    async def blocked(request: web.Request) -> web.Response:
        page = CLOUDFLARE_PAGE.replace("502: Bad gateway", "Attention Required!")
        return web.Response(status=403, text=page, content_type="text/html")

    app = web.Application()
    app.router.add_post("/a/api/worker/register", bad_gateway)
    app.router.add_post("/b/api/worker/heartbeat", blocked)
    site = await site_factory(app)
    with pytest.raises(Unreachable) as info:
        await client.register(f"{site.url}/a", register_request("http://127.0.0.1:1"), None)
    assert info.value.status == 502
    assert "api.rmatool.org.uk | 502: Bad gateway" in str(info.value)
    assert "\n" not in str(info.value)
    assert "<" not in str(info.value)
    with pytest.raises(Rejected) as rejected:
        await client.heartbeat(f"{site.url}/b", WorkerHeartbeatRequest(worker_id="w"), "t" * 20)
    assert rejected.value.status == 403
    assert str(rejected.value).endswith("Attention Required!")


async def test_backoff_grows_with_jitter_up_to_the_maximum() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 6:
            raise Unreachable(f"try {attempts}")
        return "ok"

    with capture_logs() as logs:
        result = await retry_forever(
            flaky, what="demo", initial=0.01, maximum=0.05, retry_on=(Unreachable,)
        )
    assert result == "ok"
    waits = [e["retry_in_s"] for e in logs if e["event"] == "demo_retry"]
    assert len(waits) == 5
    assert 0.01 <= waits[0] <= 0.02
    assert all(w <= 0.05 for w in waits)
    assert waits[-1] == 0.05
    assert logs[0]["error"] == "try 1"

    async def fatal() -> None:
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        await retry_forever(fatal, what="x", initial=0.01, maximum=0.01, retry_on=(Unreachable,))


async def test_join_token_is_sent_and_a_missing_one_is_retried_not_fatal(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    coord = await coordinator_factory(worker_join_token="join-token-0123456789")
    without = Agent(agent_settings(tmp_path / "a", coordinator_url=coord.url, use_tunnel=False))
    agents.append(without)
    with capture_logs() as logs:
        await without.start()
        await asyncio.sleep(0.4)
    assert not without.registered.is_set()
    retries = [e for e in logs if e["event"] == "register_retry"]
    assert retries
    assert "unauthorized" in retries[0]["error"]

    with_token = Agent(
        agent_settings(
            tmp_path / "b",
            coordinator_url=coord.url,
            use_tunnel=False,
            worker_join_token="join-token-0123456789",
        )
    )
    agents.append(with_token)
    await with_token.start()
    await asyncio.wait_for(with_token.registered.wait(), 3)
    assert "join-token-0123456789" not in repr(logs)


async def test_heartbeats_via_the_router_carry_the_coordinator_id(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    coord = await coordinator_factory("coord-r", heartbeat_interval=0.1)
    agent = Agent(
        agent_settings(
            tmp_path, coordinator_url=coord.url, use_tunnel=False, heartbeat_via="router"
        )
    )
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 3)
    beats = agent.heartbeats
    deadline = asyncio.get_running_loop().time() + 2
    while agent.heartbeats < beats + 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert agent._beat_target() == coord.url
    assert agent._beat_request().coordinator_id == "coord-r"


async def test_a_reply_that_arrives_in_pieces_is_read_whole(
    client: ControlClient, site_factory: SiteFactory
) -> None:
    """A router or tunnel may send a reply in several chunks; the client waits for all of them
    (it once parsed the first piece alone, failed validation and lost the registration)."""
    body = (
        b'{"coordinator_id": "coord-a", "coordinator_secret": "'
        + b"s" * 43
        + b'", "heartbeat_interval": 60}'
    )

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(body[:20])
        await asyncio.sleep(0.05)
        await resp.write(body[20:])
        await resp.write_eof()
        return resp

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(70):
            await resp.write(b" " * 65536)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/api/edge/register", chunked)
    site = await site_factory(app)
    req = EdgeRegisterRequest(coordinator_id="coord-a", tunnel_url="https://a.trycloudflare.com")
    reply = await client.edge_register(site.url, req, None)
    assert reply.coordinator_secret == "s" * 43
    assert reply.heartbeat_interval == 60

    app = web.Application()
    app.router.add_post("/api/edge/register", huge)
    site = await site_factory(app)
    with pytest.raises(Unreachable):
        await client.edge_register(site.url, req, None)
