"""The coordinator restarts under 200 simulated workers: a thundering herd, shed and absorbed.

Each simulated worker is the agent's own control code (``ControlClient`` + ``retry_forever``, the
path ``Agent._register`` takes): it registers, beats every interval, and on a 404 registers again
at once. The coordinator takes ``REGISTER_RATE_LIMIT=150`` registrations per second and sheds the
rest with 503 + ``Retry-After: 1``. Asserted: every worker is back within one heartbeat interval
plus the Retry-After jitter (1.5 s) plus 1 s of slack; some registrations were shed; every retry
after a 503 waited at least the Retry-After delay; and no worker saw any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from coordinator.protocol import ServiceOffer, WorkerHeartbeatRequest, WorkerRegisterRequest
from tests.worker_agent.conftest import wait_for
from worker_agent.client import ControlClient, ControlError, Rejected
from worker_agent.retry import retry_forever

N = 200
INTERVAL = 1.0
RETRY_AFTER = 1


class SimWorker:
    def __init__(self, i: int, base: str, client: ControlClient) -> None:
        self.i = i
        self.base = base
        self.client = client
        self.worker_id = f"sim-{i:04d}"
        self.token: str | None = None
        self.shed_at: list[float] = []  # when a 503 arrived
        self.tries_at: list[float] = []  # when each registration attempt started
        self.other_failures: list[str] = []

    def request(self) -> WorkerRegisterRequest:
        return WorkerRegisterRequest(
            worker_id=self.worker_id,
            worker_token=self.token,
            worker_type="cpu",
            tunnel_url=f"http://127.0.0.1:{20000 + self.i}",
            services=[ServiceOffer(name="echo")],
        )

    async def _attempt(self) -> None:
        self.tries_at.append(time.monotonic())
        try:
            reply = await self.client.register(self.base, self.request(), None)
        except ControlError as exc:
            if exc.status == 503:
                self.shed_at.append(time.monotonic())
            elif exc.status:  # an HTTP answer other than shedding (0: could not connect)
                self.other_failures.append(str(exc))
            raise
        self.token = reply.worker_token

    async def register(self) -> None:
        await retry_forever(
            self._attempt, what="sim_register", initial=0.05, maximum=0.2, retry_on=(ControlError,)
        )

    async def run(self) -> None:
        await self.register()
        while True:
            await asyncio.sleep(INTERVAL * random.uniform(0.9, 1.1))
            assert self.token is not None
            beat = WorkerHeartbeatRequest(worker_id=self.worker_id)
            try:
                await self.client.heartbeat(self.base, beat, self.token)
            except Rejected as exc:
                if exc.status in (401, 404):
                    await self.register()
                else:
                    self.other_failures.append(str(exc))
            except ControlError as exc:
                if exc.status:
                    self.other_failures.append(str(exc))


async def test_restart_with_200_workers_sheds_and_recovers(
    tmp_path: Path, coordinator_factory: Any
) -> None:
    coord = await coordinator_factory(
        heartbeat_interval=INTERVAL,
        register_rate_limit=150,
        retry_after=RETRY_AFTER,
        suspect_after=5,
        remove_after=30,
    )
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = ControlClient(session, timeout=5.0)
        sims = [SimWorker(i, coord.url, client) for i in range(N)]
        tasks = [asyncio.create_task(s.run()) for s in sims]
        try:
            # The first join is already a herd: 200 at once against 150/s.
            await wait_for(lambda: len(coord.coordinator.registry) == N, timeout=10)
            first_shed = sum(len(s.shed_at) for s in sims)
            await asyncio.sleep(INTERVAL * 1.5)  # everyone beating normally

            await coord.stop()
            await coord.start()  # same port, empty registry
            restarted = time.monotonic()
            registry = coord.coordinator.registry
            took = await wait_for(lambda: len(registry) == N, timeout=10)
            bound = INTERVAL + RETRY_AFTER * 1.5 + 1.0
            assert took <= bound, f"all {N} back after {took:.2f} s (bound {bound} s)"
            assert {r.worker_id for r in registry} == {s.worker_id for s in sims}

            shed_total = sum(len(s.shed_at) for s in sims)
            assert first_shed > 0, "200 registrations at once must be shed in part"
            assert shed_total >= first_shed
            # Every worker honoured Retry-After: its next try came at least that much later.
            for sim in sims:
                for shed in sim.shed_at:
                    later = [t for t in sim.tries_at if t > shed]
                    if later:
                        assert later[0] - shed >= RETRY_AFTER * 0.99, (
                            sim.worker_id,
                            later[0] - shed,
                        )
            # Calls that met the coordinator while it was down failed to connect or were cut;
            # no worker saw any HTTP error other than the 503s that shed load.
            failures = [f for s in sims for f in s.other_failures]
            assert failures == [], failures[:5]
            assert restarted > 0
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
