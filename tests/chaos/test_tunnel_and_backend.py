"""The tunnel process killed again and again; a backend that takes ages to load.

Stated bound: with ``TUNNEL_CHECK_INTERVAL=0.2`` and ``TUNNEL_BACKOFF_MAX=0.5``, service through
the coordinator is back within 5 s of each SIGKILL of ``cloudflared`` (the fake one, a real
process forwarding real traffic), under a new URL that the coordinator has been told.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.chaos.conftest import ADMIN, workers_view
from tests.worker_agent.conftest import agent_settings, alive, pids_in, wait_for
from worker_agent.agent import Agent

KILLS = 3
BOUND_S = 5.0


async def test_tunnel_killed_repeatedly(
    tmp_path: Path, coordinator_factory: Any, agents: list[Any], cf_state: Path
) -> None:
    coord = await coordinator_factory(heartbeat_interval=0.5)
    agent = Agent(agent_settings(tmp_path, coordinator_url=coord.url))
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 10)
    assert agent.tunnel is not None
    registry = coord.coordinator.registry
    urls = {agent.tunnel_url}
    async with aiohttp.ClientSession() as http:
        for kill in range(1, KILLS + 1):
            assert agent.tunnel.process is not None
            pid = agent.tunnel.process.pid
            old = agent.tunnel_url
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()

            def moved(old: str | None = old) -> bool:
                record = registry.get(agent.worker_id)
                return record is not None and record.tunnel_url not in (old, None)

            await wait_for(moved, timeout=BOUND_S)
            while True:  # and requests flow again through the new tunnel
                async with http.get(f"{coord.url}/service/echo/k{kill}") as resp:
                    if resp.status == 200:
                        assert (await resp.json())["worker_id"] == agent.worker_id
                        break
                assert time.monotonic() - killed < BOUND_S, "service not back within the bound"
                await asyncio.sleep(0.05)
            took = time.monotonic() - killed
            assert took < BOUND_S, f"kill {kill}: back after {took:.2f} s"
            assert not alive(pid)
            urls.add(agent.tunnel_url)
        assert len(urls) == KILLS + 1  # a new quick-tunnel URL each time
        assert agent.tunnel.restarts == KILLS
        assert len(pids_in(cf_state / "starts")) == KILLS + 1
        assert len(registry) == 1  # re-registered in place: one id, never a duplicate


async def test_slow_backend_keeps_beating_and_is_not_evicted(
    tmp_path: Path, coordinator_factory: Any, site_factory: Any, agents: list[Any]
) -> None:
    """Model loading for "minutes": probes time out, but heartbeats flow and nothing evicts."""

    async def loading(request: web.Request) -> web.Response:
        await asyncio.sleep(120)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loading)
    slow = await site_factory(app)
    # Suspect after 3 missed 0.2 s beats, removed after 1 s: a stalled agent would be evicted.
    coord = await coordinator_factory(
        heartbeat_interval=0.2, suspect_after=3, remove_after=1.0, admin_token=ADMIN
    )
    agent = Agent(
        agent_settings(
            tmp_path,
            coordinator_url=coord.url,
            use_tunnel=False,
            services=f"llm-inference={slow.url}",
            backend_probe_timeout=0.5,
            backend_check_interval=0.05,
        )
    )
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)
    registry = coord.coordinator.registry
    beats = agent.heartbeats
    states: set[str] = set()
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 3.0  # 15 intervals, 3 removal windows
        while time.monotonic() < deadline:
            view = await workers_view(http, coord.url)
            assert agent.worker_id in view, "the worker was evicted"
            states.add(view[agent.worker_id]["state"])
            await asyncio.sleep(0.1)
        async with http.post(f"{coord.url}/service/llm-inference/x", json={}) as resp:
            assert resp.status == 503  # not ready: refused at once, not queued for minutes
            assert (await resp.json())["error"] == "no_ready_workers"
    assert states == {"active"}
    assert agent.heartbeats - beats >= 10
    assert agent.registrations == 1  # never dropped and re-registered
    record = registry.get(agent.worker_id)
    assert record is not None
    assert record.offers["llm-inference"].status == "starting"
