"""Edge mode: the first edge worker is the coordinator.

A router stand-in (the edge API as the architecture specifies it, on loopback) checks each
registration through the tunnel, as the real router will. The router Worker itself is issue 4.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from tests.worker_agent.conftest import (
    FAKE_CLOUDFLARED,
    CoordinatorServer,
    RouterState,
    agent_settings,
    coordinator_settings,
    free_port,
    router_app,
    start_site,
    wait_for,
)
from worker_agent.edge import EdgeAgent
from worker_agent.tunnel import CloudflaredProcess

CoordinatorFactory = Callable[..., Awaitable[CoordinatorServer]]


def edge_settings(tmp_path: Path, router: str, **overrides: Any) -> Any:
    return agent_settings(tmp_path, worker_type="edge", coordinator_url=router, **overrides)


def embedded(tmp_path: Path) -> Any:
    return coordinator_settings(tmp_path, coordinator_port=0, coordinator_host="127.0.0.1")


async def test_edge_registers_beats_reregisters_and_deregisters(
    tmp_path: Path, agents: list[Any]
) -> None:
    state = RouterState()
    router = await start_site(router_app(state, join_token="federation-join-token-0123"))
    try:
        settings = edge_settings(
            tmp_path,
            router.url,
            edge_worker=True,
            federation_join_token="federation-join-token-0123",
        )
        edge = EdgeAgent(settings, coordinator=embedded(tmp_path))
        agents.append(edge)
        await edge.start()
        await asyncio.wait_for(edge.registered.wait(), 5)

        [reg] = state.registrations
        assert reg["coordinator_id"] == edge.coordinator_id
        assert edge.coordinator_id.startswith("coord-")
        assert reg["tunnel_url"] == edge.tunnel_url != edge.local_url  # through the tunnel
        saved = json.loads((tmp_path / "agent-state" / "identity.json").read_text())
        assert saved["coordinator_id"] == edge.coordinator_id
        # The first registration already proposes the secret the agent saved beforehand, so a
        # lost reply cannot lock the coordinator out of its own id.
        assert len(reg["coordinator_secret"]) >= 32
        assert saved["coordinator_secret"] == reg["coordinator_secret"]
        assert saved["coordinator_secret"] == state.rows[edge.coordinator_id]["secret"]

        # This machine is also a compute worker of its own coordinator; beats carry the summary.
        await wait_for(
            lambda: any(
                b["workers"] == 1 and [s["name"] for s in b["services"]] == ["echo"]
                for b in state.heartbeats
            )
        )
        beat = state.heartbeats[-1]
        assert beat["services"][0]["ready_workers"] == 1
        assert 0 <= beat["load"] <= 1

        # The router forgets it (restart): the next beat is 404 and it registers again at once.
        state.rows.clear()
        await wait_for(lambda: len(state.registrations) == 2, timeout=3)
        assert edge.registrations == 2

        await edge.shutdown()
        assert state.deleted == [edge.coordinator_id]
        assert state.heartbeats[-1]["state"] == "draining"
    finally:
        await router.runner.cleanup()

    # A restart keeps the coordinator id
    again = EdgeAgent(edge_settings(tmp_path, "", use_tunnel=False), coordinator=embedded(tmp_path))
    agents.append(again)
    await again.start()
    assert again.coordinator_id == edge.coordinator_id


async def test_edge_serves_standalone_without_a_router(tmp_path: Path, agents: list[Any]) -> None:
    edge = EdgeAgent(edge_settings(tmp_path, ""), coordinator=embedded(tmp_path))
    agents.append(edge)
    with capture_logs() as logs:
        await edge.start()
    assert any(e["event"] == "edge_standalone" for e in logs)
    async with aiohttp.ClientSession() as http, http.get(f"{edge.tunnel_url}/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["coordinator_id"] == edge.coordinator_id


async def test_edge_keeps_serving_and_retrying_when_the_router_is_unreachable(
    tmp_path: Path, agents: list[Any]
) -> None:
    port = free_port()
    edge = EdgeAgent(
        edge_settings(tmp_path, f"http://127.0.0.1:{port}"), coordinator=embedded(tmp_path)
    )
    agents.append(edge)
    with capture_logs() as logs:
        await edge.start()
        await asyncio.sleep(0.5)
    assert sum(e["event"] == "edge_register_retry" for e in logs) >= 2
    async with aiohttp.ClientSession() as http, http.get(f"{edge.tunnel_url}/health") as resp:
        assert resp.status == 200
    # the router comes up: the edge registers without a restart
    state = RouterState()
    router = await start_site(router_app(state), port)
    try:
        await asyncio.wait_for(edge.registered.wait(), 3)
        assert state.registrations[0]["coordinator_id"] == edge.coordinator_id
    finally:
        await edge.shutdown()
        await router.runner.cleanup()


async def test_edge_fronts_the_compose_coordinator_and_its_cloudflared(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    agents: list[Any],
    reap: list[int],
) -> None:
    """The compose stack: a coordinator container and a separate cloudflared container."""
    coord = await coordinator_factory("coord-compose")
    metrics = f"127.0.0.1:{free_port()}"
    sidecar = CloudflaredProcess(
        [str(FAKE_CLOUDFLARED), "tunnel", "--url", coord.url, "--metrics", metrics], metrics
    )
    await sidecar.start()
    assert sidecar.pid is not None
    reap.append(sidecar.pid)
    state = RouterState()
    router = await start_site(router_app(state))
    try:
        edge = EdgeAgent(
            edge_settings(
                tmp_path,
                router.url,
                local_coordinator_url=coord.url,
                tunnel_metrics_url=f"http://{metrics}",
            )
        )
        agents.append(edge)
        await edge.start()
        await asyncio.wait_for(edge.registered.wait(), 5)
        assert edge.embedded is None
        assert edge.coordinator_id == "coord-compose"
        [reg] = state.registrations
        assert reg["tunnel_url"] == sidecar.banner_url
        await wait_for(lambda: len(state.heartbeats) >= 1)
        assert state.heartbeats[0]["workers"] == 0
        await edge.shutdown()
        assert state.deleted == ["coord-compose"]
    finally:
        await router.runner.cleanup()
        await sidecar.stop(3.0)


async def test_the_edge_worker_has_a_tunnel_of_its_own(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    agents: list[Any],
    reap: list[int],
) -> None:
    """EDGE_WORKER=true beside the compose stack's cloudflared: the worker must not advertise
    the coordinator's tunnel URL (the coordinator would proxy its requests to itself)."""
    coord = await coordinator_factory("coord-compose")
    metrics = f"127.0.0.1:{free_port()}"
    sidecar = CloudflaredProcess(
        [str(FAKE_CLOUDFLARED), "tunnel", "--url", coord.url, "--metrics", metrics], metrics
    )
    await sidecar.start()
    assert sidecar.pid is not None
    reap.append(sidecar.pid)
    try:
        edge = EdgeAgent(
            edge_settings(
                tmp_path,
                "",
                local_coordinator_url=coord.url,
                tunnel_metrics_url=f"http://{metrics}",
                edge_worker=True,
            )
        )
        agents.append(edge)
        await edge.start()
        assert edge.worker is not None
        await asyncio.wait_for(edge.worker.registered.wait(), 5)
        assert edge.worker.tunnel_url not in (None, edge.tunnel_url)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{edge.tunnel_url}/service/echo/hello") as resp,
        ):
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["worker_id"] == edge.worker.worker_id
        await edge.shutdown()
    finally:
        await sidecar.stop(3.0)


async def test_a_fronted_coordinator_that_comes_back_with_a_new_id_is_registered_under_it(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    agents: list[Any],
    reap: list[int],
) -> None:
    """The compose coordinator is recreated without its state volume: a new coordinator_id
    behind the same tunnel. The registrar must register that id (the router checks it)."""
    coord = await coordinator_factory("coord-before")
    metrics = f"127.0.0.1:{free_port()}"
    sidecar = CloudflaredProcess(
        [str(FAKE_CLOUDFLARED), "tunnel", "--url", coord.url, "--metrics", metrics], metrics
    )
    await sidecar.start()
    assert sidecar.pid is not None
    reap.append(sidecar.pid)
    state = RouterState()
    router = await start_site(router_app(state))
    try:
        edge = EdgeAgent(
            edge_settings(
                tmp_path,
                router.url,
                local_coordinator_url=coord.url,
                tunnel_metrics_url=f"http://{metrics}",
            )
        )
        agents.append(edge)
        await edge.start()
        await asyncio.wait_for(edge.registered.wait(), 5)
        assert state.registrations[-1]["coordinator_id"] == "coord-before"

        await coord.stop()
        coord.coordinator_id = "coord-after"
        await coord.start()
        await wait_for(lambda: "coord-after" in state.rows, timeout=5)
        assert edge.coordinator_id == "coord-after"
        await wait_for(lambda: any(b["coordinator_id"] == "coord-after" for b in state.heartbeats))
    finally:
        await router.runner.cleanup()
        await sidecar.stop(3.0)
