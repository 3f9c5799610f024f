"""End to end: a real coordinator, the agent's real gateway, and the fake cloudflared in between.

register → serve through the tunnel → heartbeat; coordinator restart; failover between two
coordinators behind one URL; a killed tunnel process; re-registration after 404/401.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.worker_agent.conftest import (
    CoordinatorServer,
    Site,
    agent_settings,
    alive,
    failover_front_app,
    pids_in,
    start_site,
    wait_for,
)
from worker_agent.agent import Agent

CoordinatorFactory = Callable[..., Awaitable[CoordinatorServer]]
SiteFactory = Callable[..., Awaitable[Site]]


async def test_register_serve_and_heartbeat_through_the_tunnel(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    site_factory: SiteFactory,
    agents: list[Any],
    cf_state: Path,
) -> None:
    coord = await coordinator_factory()
    backend = await site_factory()
    started = time.monotonic()
    agent = Agent(
        agent_settings(tmp_path, coordinator_url=coord.url, services=f"stream={backend.url}")
    )
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)
    assert time.monotonic() - started < 5

    # The coordinator knows the worker by its tunnel URL (the fake's forwarder), not the gateway.
    assert agent.tunnel is not None
    assert agent.gateway is not None
    assert agent.tunnel.mode == "quick"
    record = coord.coordinator.registry.get(agent.worker_id)
    assert record is not None
    assert record.tunnel_url == agent.tunnel_url
    assert agent.tunnel_url is not None
    assert agent.tunnel_url.startswith("http://127.0.0.1:")
    assert not agent.tunnel_url.endswith(f":{agent.gateway.port}")
    assert sorted(record.assigned) == ["echo", "stream"]
    assert record.capabilities.cpu_cores >= 1

    async with aiohttp.ClientSession() as http:
        # echo through coordinator → fake tunnel → gateway
        async with http.get(
            f"{coord.url}/service/echo/hello/there?x=1&y=%20z",
            headers={"X-Request-Id": "req-123", "X-Custom": "kept"},
        ) as resp:
            assert resp.status == 200
            echo = await resp.json()
            assert resp.headers["X-Request-Id"] == "req-123"
        assert echo["worker_id"] == agent.worker_id
        assert echo["method"] == "GET"
        assert echo["path"] == "/hello/there"
        assert echo["query"] == "x=1&y=%20z"
        assert echo["request_id"] == "req-123"
        assert echo["headers"]["X-Custom"] == "kept"
        assert not any(k.lower().startswith("x-rma-") for k in echo["headers"])

        # POST body size
        async with http.post(f"{coord.url}/service/echo/upload", data=b"x" * 100_000) as resp:
            assert (await resp.json())["body_bytes"] == 100_000

        # SSE over POST arrives token by token through both hops
        arrivals: list[tuple[float, bytes]] = []
        t0 = time.monotonic()
        async with http.post(
            f"{coord.url}/service/stream/stream?n=4&gap=0.25", json={"prompt": "hi"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in resp.content.iter_any():
                arrivals.append((time.monotonic() - t0, chunk))
        body = b"".join(c for _, c in arrivals)
        assert body == b"".join(f"data: token-{i}\n\n".encode() for i in range(4))
        assert arrivals[0][0] < 0.5, "the first token must not wait for the end of the stream"
        assert arrivals[-1][0] >= 0.75

    # Heartbeats reach the coordinator with the backend's health
    beats = agent.heartbeats
    await wait_for(lambda: agent.heartbeats >= beats + 2, timeout=3)
    assert record.offers["stream"].status == "ready"

    # The identity is persisted, private, and holds the token the coordinator issued
    path = tmp_path / "agent-state" / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert agent.worker_id in path.read_text()

    # Shutdown unregisters and stops cloudflared
    pid = agent.tunnel.process.pid if agent.tunnel.process else None
    assert pid is not None
    await agent.shutdown()
    assert coord.coordinator.registry.get(agent.worker_id) is None
    assert not alive(pid)


async def test_restart_keeps_identity(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    coord = await coordinator_factory()
    first = Agent(agent_settings(tmp_path, coordinator_url=coord.url, use_tunnel=False))
    agents.append(first)
    await first.start()
    await asyncio.wait_for(first.registered.wait(), 5)
    worker_id = first.worker_id
    await first.shutdown()

    second = Agent(agent_settings(tmp_path, coordinator_url=coord.url, use_tunnel=False))
    agents.append(second)
    await second.start()
    await asyncio.wait_for(second.registered.wait(), 5)
    assert second.worker_id == worker_id
    assert coord.coordinator.registry.get(worker_id) is not None


async def test_coordinator_restart_reregisters_same_id_within_one_interval(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    coord = await coordinator_factory(heartbeat_interval=0.5)
    agent = Agent(agent_settings(tmp_path, coordinator_url=coord.url))
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)
    worker_id = agent.worker_id
    assert agent.interval == 0.5

    await coord.stop()
    await coord.start()  # same port, empty registry
    assert coord.coordinator.registry.get(worker_id) is None
    took = await wait_for(lambda: coord.coordinator.registry.get(worker_id) is not None, 3)
    assert took <= 0.5 + 0.3, f"re-registered after {took:.2f} s, interval is 0.5 s"
    assert agent.registrations == 2
    async with aiohttp.ClientSession() as http, http.get(f"{coord.url}/service/echo/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["worker_id"] == worker_id


async def test_failover_between_two_coordinators_behind_one_url(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    agents: list[Any],
) -> None:
    # Each coordinator tells workers to beat it directly (as behind the router).
    first = await coordinator_factory("coord-a", advertise_self=True, heartbeat_interval=0.2)
    second = await coordinator_factory("coord-b", advertise_self=True, heartbeat_interval=0.2)
    front = await start_site(failover_front_app([first.url, second.url]))
    try:
        agent = Agent(agent_settings(tmp_path, coordinator_url=front.url, failover_after=2))
        agents.append(agent)
        await agent.start()
        await asyncio.wait_for(agent.registered.wait(), 5)
        assert agent.registration is not None
        assert agent.registration.coordinator_id == "coord-a"
        assert agent.registration.coordinator_url == first.url

        await first.stop()  # coordinator A dies; the front now reaches B
        # The agent has moved once B holds it and the agent has read B's reply (B stores the
        # worker a moment before its answer reaches the agent).
        took = await wait_for(
            lambda: (
                second.coordinator.registry.get(agent.worker_id) is not None
                and agent.registration is not None
                and agent.registration.coordinator_id == "coord-b"
            )
        )
        # two failed beats (0.2 s apart), then one registration through the front
        assert took < 2.0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{front.url}/service/echo/after-failover") as resp:
                assert resp.status == 200
                assert (await resp.json())["worker_id"] == agent.worker_id
            beats = agent.heartbeats
            await wait_for(lambda: agent.heartbeats >= beats + 2)
    finally:
        await front.runner.cleanup()


async def test_tunnel_process_killed_restarts_and_new_url_is_registered(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    agents: list[Any],
    cf_state: Path,
) -> None:
    coord = await coordinator_factory()
    agent = Agent(agent_settings(tmp_path, coordinator_url=coord.url))
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)
    assert agent.tunnel is not None
    assert agent.tunnel.process is not None
    old_url, old_pid = agent.tunnel_url, agent.tunnel.process.pid
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)
    record = coord.coordinator.registry.get(agent.worker_id)
    await wait_for(
        lambda: (
            (r := coord.coordinator.registry.get(agent.worker_id)) is not None
            and r.tunnel_url != old_url
        ),
        timeout=8,
    )
    new = coord.coordinator.registry.get(agent.worker_id)
    assert new is not None
    assert record is not None
    assert new.tunnel_url == agent.tunnel_url != old_url
    assert agent.tunnel.restarts == 1
    assert len(pids_in(cf_state / "starts")) == 2
    async with aiohttp.ClientSession() as http, http.get(f"{coord.url}/service/echo/") as resp:
        assert resp.status == 200


async def test_unknown_worker_and_bad_token_reregister_at_once(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    coord = await coordinator_factory(heartbeat_interval=0.2)
    agent = Agent(agent_settings(tmp_path, coordinator_url=coord.url, use_tunnel=False))
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)

    # The coordinator forgets the worker (e.g. it expired): the next beat gets 404.
    coord.coordinator.registry.remove(agent.worker_id, "test")
    await wait_for(lambda: agent.registrations == 2, timeout=2)
    assert coord.coordinator.registry.get(agent.worker_id) is not None

    # The coordinator forgot the worker and the agent holds a token it never issued: the
    # agent registers again with the token it holds (a worker proposes its own token, so a
    # registration whose reply was lost can be repeated), and its beats are accepted.
    assert agent.identity is not None
    agent.identity.worker_token = "a-token-the-coordinator-never-issued"
    coord.coordinator.registry.remove(agent.worker_id, "test")
    await wait_for(lambda: agent.registrations == 3, timeout=2)
    record = coord.coordinator.registry.authenticate(agent.worker_id, agent.identity.worker_token)
    beats = agent.heartbeats
    await wait_for(lambda: agent.heartbeats >= beats + 2)
    assert coord.coordinator.registry.get(agent.worker_id) is record


async def test_a_lost_registration_reply_is_repeated_with_the_same_token(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    """The coordinator stored the worker but its answer never arrived: the agent registers
    again with the token it proposed and is accepted at once, not locked out of its own id."""
    coord = await coordinator_factory(heartbeat_interval=0.2)
    replies: list[int] = []

    async def lossy(request: web.Request) -> web.StreamResponse:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{coord.url}/api/worker/register",
                data=await request.read(),
                headers={"Content-Type": "application/json"},
            ) as upstream,
        ):
            body = await upstream.read()
            replies.append(upstream.status)
        if len(replies) == 1:  # processed by the coordinator, answer lost on the way back
            return web.json_response({"error": "bad_gateway", "detail": "lost"}, status=502)
        return web.Response(body=body, status=upstream.status, content_type="application/json")

    front_app = web.Application()
    front_app.router.add_post("/api/worker/register", lossy)
    front = await start_site(front_app)
    try:
        agent = Agent(
            agent_settings(
                tmp_path,
                coordinator_url=front.url,
                use_tunnel=False,
                register_backoff_initial=0.05,
                register_backoff_max=0.1,
            )
        )
        agents.append(agent)
        await agent.start()
        await asyncio.wait_for(agent.registered.wait(), 5)
        assert replies == [200, 200]  # the second registration was accepted, not 403
        assert agent.identity is not None
        coord.coordinator.registry.authenticate(agent.worker_id, agent.identity.worker_token)
    finally:
        await front.runner.cleanup()


async def test_start_does_not_exit_while_the_coordinator_is_unreachable(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    from tests.worker_agent.conftest import free_port

    port = free_port()
    agent = Agent(
        agent_settings(tmp_path, coordinator_url=f"http://127.0.0.1:{port}", use_tunnel=False)
    )
    agents.append(agent)
    await agent.start()
    await asyncio.sleep(0.6)  # several backoff rounds against a closed port
    assert not agent.registered.is_set()
    coord = CoordinatorServer(tmp_path, "coord-late", {}, port=port)
    await coord.start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 3)
        assert coord.coordinator.registry.get(agent.worker_id) is not None
    finally:
        await agent.shutdown()
        await coord.stop()


async def test_a_slow_backend_never_delays_heartbeats(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    site_factory: SiteFactory,
    agents: list[Any],
) -> None:
    from aiohttp import web

    async def loading(request: web.Request) -> web.Response:
        await asyncio.sleep(10)  # a model that takes ages to load
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loading)
    slow = await site_factory(app)
    coord = await coordinator_factory(heartbeat_interval=0.1)
    agent = Agent(
        agent_settings(
            tmp_path,
            coordinator_url=coord.url,
            use_tunnel=False,
            services=f"llm-inference={slow.url}",
            backend_probe_timeout=0.3,
            backend_check_interval=0.05,
        )
    )
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 3)
    beats = agent.heartbeats
    took = await wait_for(lambda: agent.heartbeats >= beats + 8, timeout=3)
    assert took < 1.5, f"8 beats at 0.1 s took {took:.2f} s"
    assert agent.backends is not None
    backend = agent.backends.get("llm-inference")
    assert backend is not None
    assert backend.status == "starting"
    record = coord.coordinator.registry.get(agent.worker_id)
    assert record is not None
    assert record.offers["llm-inference"].status == "starting"
