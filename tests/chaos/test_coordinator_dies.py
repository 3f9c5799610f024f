"""A coordinator process is SIGKILLed in the middle of a streamed answer.

Two real ``rma-coordinator`` processes, each with an in-process agent serving ``stream`` from one
backend. The client's stream through coordinator 1 ends with an error as soon as the process dies
(no hang, no stream that looks complete), and the next request through coordinator 2 succeeds.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.chaos.conftest import coordinator_env, spawn, wait_http, workers_view
from tests.worker_agent.conftest import agent_settings, free_port, wait_for
from worker_agent.agent import Agent


async def test_coordinator_killed_mid_stream(
    tmp_path: Path, site_factory: Any, agents: list[Any], procs: list[Any]
) -> None:
    backend = await site_factory()
    urls = []
    coordinators = []
    for cid in ("coord-1", "coord-2"):
        port = free_port()
        env = coordinator_env(tmp_path, port, cid, HEARTBEAT_INTERVAL="1")
        coordinators.append(await spawn(procs, "rma-coordinator", env=env))
        urls.append(f"http://127.0.0.1:{port}")
    await asyncio.gather(*(wait_http(f"{u}/health") for u in urls))
    for i, url in enumerate(urls):
        agent = Agent(
            agent_settings(
                tmp_path / f"agent{i}",
                coordinator_url=url,
                services=f"stream={backend.url}",
                use_tunnel=False,
            )
        )
        agents.append(agent)
        await agent.start()
    await asyncio.gather(*(wait_for(a.registered.is_set, timeout=10) for a in agents))

    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{urls[0]}/service/stream/stream?n=50&gap=0.1", json={})
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readany(), 5)
        assert first.startswith(b"data: token-0")

        coordinators[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        error: BaseException | None = None
        try:
            async with asyncio.timeout(5):
                async for _chunk in resp.content.iter_any():
                    pass
        except aiohttp.ClientPayloadError as exc:
            error = exc
        finally:
            resp.close()
        took = time.monotonic() - killed
        assert error is not None, "a cut stream must end with an error"
        assert took < 2.0, f"the client learnt of the dead coordinator after {took:.2f} s"

        # A new request to the dead coordinator fails fast (connection refused), not a hang.
        started = time.monotonic()
        try:
            async with http.get(f"{urls[0]}/health", timeout=aiohttp.ClientTimeout(total=5)):
                raise AssertionError("the killed coordinator still answers")
        except aiohttp.ClientConnectionError:
            pass
        assert time.monotonic() - started < 1.0

        # The next request through the other coordinator succeeds, streamed in full.
        async with http.post(f"{urls[1]}/service/stream/stream?n=3&gap=0", json={}) as ok:
            assert ok.status == 200
            assert await ok.read() == b"".join(f"data: token-{i}\n\n".encode() for i in range(3))
        view = await workers_view(http, urls[1])
        assert len(view) == 1
        assert next(iter(view.values()))["state"] == "active"
