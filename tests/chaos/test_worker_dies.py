"""A worker process is SIGKILLed in the middle of a streamed answer.

Two workers serve ``stream``: A is a real ``rma-worker`` process, B an in-process agent, each with
its own backend (so the test knows which one got a request). A client's stream through A is cut
when A dies: the client sees the stream end with an error at once, not a hang. The next request
succeeds on B, and A becomes ``suspect`` after ``STRIKE_LIMIT`` failed connections, every one of
which is retried on B so no client sees it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.chaos.conftest import ADMIN, spawn, workers_view
from tests.worker_agent.conftest import agent_env, agent_settings, free_port, wait_for
from worker_agent.agent import Agent

STRIKES = 2


async def test_worker_killed_mid_stream(
    tmp_path: Path,
    coordinator_factory: Any,
    site_factory: Any,
    agents: list[Any],
    procs: list[Any],
) -> None:
    coord = await coordinator_factory(
        heartbeat_interval=5.0, strike_limit=STRIKES, proxy_retries=1, admin_token=ADMIN
    )
    backend_a = await site_factory()
    backend_b = await site_factory()
    port_a = free_port()
    env = agent_env(
        tmp_path / "a",
        COORDINATOR_URL=coord.url,
        WORKER_ID="w-a",
        SERVICES=f"stream={backend_a.url}",
        ECHO_SERVICE="false",
        USE_TUNNEL="false",
        GATEWAY_PORT=str(port_a),
        TUNNEL_URL=f"http://127.0.0.1:{port_a}",
        LOG_LEVEL="warning",
    )
    proc_a = await spawn(procs, "rma-worker", "run", env=env)
    agent_b = Agent(
        agent_settings(
            tmp_path / "b",
            coordinator_url=coord.url,
            worker_id="w-b",
            services=f"stream={backend_b.url}",
            echo_service=False,
            use_tunnel=False,
        )
    )
    agents.append(agent_b)
    await agent_b.start()
    registry = coord.coordinator.registry
    await wait_for(lambda: {r.worker_id for r in registry} == {"w-a", "w-b"}, timeout=15)

    async with aiohttp.ClientSession() as http:
        # Stream until one lands on A (the scheduler spreads requests over both).
        url = f"{coord.url}/service/stream/stream?n=50&gap=0.1"
        for _ in range(20):
            before = len(backend_a.seen)
            resp = await http.post(url, json={"prompt": "hi"})
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readany(), 5)
            assert first.startswith(b"data: token-0")
            if len(backend_a.seen) > before:
                break
            resp.close()
        else:
            raise AssertionError("no stream was routed to worker A")

        proc_a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        error: BaseException | None = None
        try:
            async with asyncio.timeout(5):  # a hang fails here
                async for _chunk in resp.content.iter_any():
                    pass
        except aiohttp.ClientPayloadError as exc:
            error = exc
        finally:
            resp.close()
        took = time.monotonic() - killed
        assert error is not None, "the cut stream must end with an error, not look complete"
        assert took < 2.0, f"the client learnt of the dead worker after {took:.2f} s"

        # The next requests succeed: on B, or on A's port after a failed connect + retry on B.
        for i in range(40):
            async with http.post(f"{coord.url}/service/stream/stream?n=2&gap=0", json={}) as r:
                assert r.status == 200, (i, await r.text())
                assert await r.read() == b"data: token-0\n\ndata: token-1\n\n"
            record = registry.get("w-a")
            if record is not None and record.strikes >= STRIKES:
                break

        view = await workers_view(http, coord.url)
        assert view["w-a"]["state"] == "suspect", view["w-a"]
        assert view["w-a"]["strikes"] >= STRIKES
        assert view["w-b"]["state"] == "active"
