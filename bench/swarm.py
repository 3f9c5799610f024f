"""Swarm simulator: N workers in one asyncio process against a coordinator (or the router).

Each simulated worker has its own real loopback listener (a distinct port: the tunnel URL the
coordinator accepts under ``DEV_ALLOW_LOOPBACK=true`` is ``http://127.0.0.1:<port>``), registers,
beats at the interval the coordinator gives with varying load, and serves ``echo`` and ``tokens``
(a streamed token backend, SSE) behind the gateway key. Workers churn at a given rate: half leave
cleanly (unregister), half die silently (their listener closes without a word), and as many join.
A request generator drives the target's ``/service/...`` at a given rate.

    python -m bench.swarm --n 10000 --duration 60 --churn 60 --rps 50 \\
        --target http://127.0.0.1:8080 --coordinator-pid <pid>

The coordinator needs ``DEV_ALLOW_LOOPBACK=true`` and ``CATALOG_ALLOW_UNLISTED=true`` (``tokens``
is not in the built-in catalog). 10,000 listeners need 10,000 descriptors plus the client
connections: the soft ``RLIMIT_NOFILE`` is raised to the hard limit. Prints one JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from aiohttp import web

GATEWAY_KEY_HEADER = "X-RMA-Gateway-Key"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Stats:
    registered: int = 0
    register_shed: int = 0
    register_failed: int = 0
    reregistered: int = 0
    beats_ok: int = 0
    beats_failed: int = 0
    left: int = 0
    died: int = 0
    joined: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class SimWorker:
    def __init__(self, swarm: Swarm, index: int) -> None:
        self.swarm = swarm
        self.index = index
        self.key = secrets.token_urlsafe(24)
        self.worker_id: str | None = None
        self.token: str | None = None
        self.site: web.SockSite | None = None
        self.port = 0
        self.task: asyncio.Task[None] | None = None
        self.interval = swarm.interval

    async def listen(self) -> None:
        # A departed worker's URL must stay dead (a dead quick tunnel never comes back), so a
        # port that served an earlier worker is never reused: the coordinator may still route to
        # it until that worker turns suspect, and must then see a refused connection, not a
        # stranger's gateway.
        while True:
            site = web.TCPSite(self.swarm.runner, "127.0.0.1", 0, backlog=64)
            await site.start()
            assert site._server is not None
            sockets = getattr(site._server, "sockets", None)
            assert sockets
            port = int(sockets[0].getsockname()[1])
            if port not in self.swarm.retired_ports:
                break
            await site.stop()
        self.port = port
        self.site = site  # type: ignore[assignment]
        self.swarm.by_port[self.port] = self

    async def register(self) -> None:
        sw = self.swarm
        body = {
            "worker_type": "cpu",
            "tunnel_url": f"http://127.0.0.1:{self.port}",
            "gateway_key": self.key,
            "services": [{"name": "echo"}, {"name": "tokens", "max_concurrency": 8}],
            "capabilities": {"cpu_cores": 4, "ram_total_mb": 8192},
            "agent_version": "swarm",
        }
        if self.worker_id and self.token:
            body |= {"worker_id": self.worker_id, "worker_token": self.token}
        headers = {"Authorization": f"Bearer {sw.join_token}"} if sw.join_token else {}
        delay = 0.2
        while True:
            try:
                async with (
                    sw.register_gate,
                    sw.control.post(
                        f"{sw.target}/api/worker/register", json=body, headers=headers
                    ) as resp,
                ):
                    data = await resp.json(content_type=None)
                    if resp.status == 200:
                        self.worker_id = data["worker_id"]
                        self.token = data["worker_token"]
                        self.beat_url = data.get("coordinator_url") or sw.target
                        if not self.beat_url.startswith("http"):
                            self.beat_url = sw.target
                        self.interval = float(data.get("heartbeat_interval", self.interval))
                        sw.interval = self.interval
                        return
                    if resp.status in (429, 503):
                        sw.stats.register_shed += 1
                        after = float(resp.headers.get("Retry-After", "1"))
                        await asyncio.sleep(after * (1 + random.random() / 2))
                        continue
                    sw.stats.register_failed += 1
                    sw.stats.error(f"register_{resp.status}_{data.get('error')}")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                sw.stats.register_failed += 1
                sw.stats.error(f"register_{type(exc).__name__}")
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 10.0)

    async def run(self) -> None:
        sw = self.swarm
        await self.register()
        sw.stats.registered += 1
        sw.registered.add(self)
        # The first beat lands anywhere in the interval: no lock-step across the swarm.
        await asyncio.sleep(random.uniform(0, self.interval))
        while True:
            load = random.randint(0, 4)
            beat = {
                "worker_id": self.worker_id,
                "active_requests": load,
                "cpu_pct": round(random.uniform(1, 95), 1),
                "ram_available_mb": random.randint(1000, 8000),
            }
            try:
                async with sw.control.post(
                    f"{self.beat_url}/api/worker/heartbeat",
                    json=beat,
                    headers={"Authorization": f"Bearer {self.token}"},
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        sw.stats.beats_ok += 1
                    elif resp.status in (401, 404):
                        sw.stats.reregistered += 1
                        await self.register()
                    else:
                        sw.stats.beats_failed += 1
                        sw.stats.error(f"beat_{resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                sw.stats.beats_failed += 1
                sw.stats.error(f"beat_{type(exc).__name__}")
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))

    async def stop(self, clean: bool) -> None:
        sw = self.swarm
        sw.registered.discard(self)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if clean and self.worker_id and self.token:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with sw.control.delete(
                    f"{self.beat_url}/api/worker/{self.worker_id}",
                    headers={"Authorization": f"Bearer {self.token}"},
                ) as resp:
                    await resp.read()
        if self.site is not None:
            await self.site.stop()
        sw.by_port.pop(self.port, None)
        sw.retired_ports.add(self.port)


class Swarm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.target = args.target.rstrip("/")
        self.n = args.n
        self.churn = args.churn
        self.rps = args.rps
        self.duration = args.duration
        self.join_token = args.join_token
        self.interval = 15.0
        self.stats = Stats()
        self.by_port: dict[int, SimWorker] = {}
        self.retired_ports: set[int] = set()
        self.registered: set[SimWorker] = set()
        self.workers: list[SimWorker] = []
        self.register_gate = asyncio.Semaphore(args.register_concurrency)
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        self.control: aiohttp.ClientSession
        self.public: aiohttp.ClientSession
        self.coordinator = psutil.Process(args.coordinator_pid) if args.coordinator_pid else None
        self.next_index = 0

    # ---------------------------------------------------------------- the workers' gateway

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/service/{name}/{tail:.*}", self.serve)
        return app

    async def serve(self, request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        worker = self.by_port.get(sock[1]) if sock else None
        if worker is None and request.transport is not None:
            # A keep-alive connection that outlived its worker: a dead worker answers nothing.
            request.transport.abort()
            return web.Response(status=503)
        if worker is None or request.headers.get(GATEWAY_KEY_HEADER) != worker.key:
            return web.json_response({"error": "unauthorized", "detail": None}, status=401)
        body = await request.read()
        if request.match_info["name"] == "tokens":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(int(request.query.get("n", "5"))):
                await resp.write(f"data: token-{i}\n\n".encode())
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        return web.json_response(
            {"worker_id": worker.worker_id, "path": request.match_info["tail"], "bytes": len(body)}
        )

    # ---------------------------------------------------------------- lifecycle

    async def spawn(self) -> SimWorker:
        worker = SimWorker(self, self.next_index)
        self.next_index += 1
        await worker.listen()
        worker.task = asyncio.create_task(worker.run())
        self.workers.append(worker)
        return worker

    async def churner(self) -> None:
        if self.churn <= 0:
            return
        while True:
            await asyncio.sleep(random.expovariate(self.churn / 60.0))
            if not self.registered:
                continue
            victim = random.choice(list(self.registered))
            clean = random.random() < 0.5
            await victim.stop(clean)
            self.workers.remove(victim)
            if clean:
                self.stats.left += 1
            else:
                self.stats.died += 1
            await self.spawn()
            self.stats.joined += 1

    async def one_request(self) -> None:
        started = time.monotonic()
        try:
            if random.random() < 0.5:
                url = f"{self.target}/service/echo/swarm?x={random.randint(0, 9)}"
                async with self.public.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            else:
                url = f"{self.target}/service/tokens/generate?n=5"
                async with self.public.post(url, json={"prompt": "hi"}) as resp:
                    body = await resp.read()
                    ok = resp.status == 200 and body.count(b"data: ") == 5
            if not ok:
                self.stats.error(f"request_{resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            self.stats.error(f"request_{type(exc).__name__}")
        if ok:
            self.stats.requests_ok += 1
            self.stats.latencies.append(time.monotonic() - started)
        else:
            self.stats.requests_failed += 1

    async def load(self) -> None:
        if self.rps <= 0:
            return
        pending: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(random.expovariate(self.rps))
            task = asyncio.create_task(self.one_request())
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def run(self) -> dict[str, Any]:
        fd_limit = raise_fd_limit()
        await self.runner.setup()
        self.control = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self.public = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=128),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        if self.coordinator is not None:
            self.coordinator.cpu_percent(None)
        started = time.monotonic()
        try:
            for _ in range(self.n):
                await self.spawn()
            listening = time.monotonic() - started
            while len(self.registered) < self.n:
                await asyncio.sleep(0.05)
            registration_s = time.monotonic() - started
            # Steady state: churn and public requests for the duration.
            beats0, t0 = self.stats.beats_ok, time.monotonic()
            if self.coordinator is not None:
                self.coordinator.cpu_percent(None)
            background = [asyncio.create_task(self.churner()), asyncio.create_task(self.load())]
            await asyncio.sleep(self.duration)
            window = time.monotonic() - t0
            beats = self.stats.beats_ok - beats0
            for task in background:
                task.cancel()
            coord: dict[str, Any] = {}
            if self.coordinator is not None:
                coord = {
                    "coordinator_rss_mb": round(self.coordinator.memory_info().rss / 2**20, 1),
                    "coordinator_cpu_pct": self.coordinator.cpu_percent(None),
                }
            await asyncio.sleep(0.5)  # let in-flight requests finish
        finally:
            for worker in list(self.workers):
                if worker.task is not None:
                    worker.task.cancel()
            await asyncio.gather(
                *(w.task for w in self.workers if w.task is not None), return_exceptions=True
            )
            await self.control.close()
            await self.public.close()
            await self.runner.cleanup()
        s = self.stats
        total = s.requests_ok + s.requests_failed
        return {
            "workers": self.n,
            "fd_limit": fd_limit,
            "listeners_up_s": round(listening, 2),
            "registration_s": round(registration_s, 2),
            "heartbeat_interval_s": self.interval,
            "steady_window_s": round(window, 1),
            "heartbeats_per_s": round(beats / window, 1),
            "heartbeats_expected_per_s": round(self.n / self.interval, 1),
            "beats_failed": s.beats_failed,
            "register_shed": s.register_shed,
            "register_failed": s.register_failed,
            "reregistered": s.reregistered,
            "churn": {"left": s.left, "died": s.died, "joined": s.joined},
            "requests": total,
            "request_success_rate": round(s.requests_ok / total, 4) if total else None,
            "latency_p50_ms": round(percentile(s.latencies, 0.50) * 1000, 2),
            "latency_p99_ms": round(percentile(s.latencies, 0.99) * 1000, 2),
            "errors": s.errors,
            **coord,
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm", description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="simulated workers")
    parser.add_argument("--churn", type=float, default=0.0, help="workers replaced per minute")
    parser.add_argument("--rps", type=float, default=10.0, help="public requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="steady-state seconds")
    parser.add_argument("--target", default="http://127.0.0.1:8080", help="coordinator/router")
    parser.add_argument("--join-token", default=None, help="WORKER_JOIN_TOKEN, if required")
    parser.add_argument("--coordinator-pid", type=int, default=None, help="report its RSS/CPU")
    parser.add_argument("--register-concurrency", type=int, default=128)
    return parser


async def run_swarm(argv: list[str]) -> dict[str, Any]:
    return await Swarm(build_parser().parse_args(argv)).run()


def main(argv: list[str] | None = None) -> int:
    result = asyncio.run(run_swarm(sys.argv[1:] if argv is None else argv))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
