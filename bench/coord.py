"""The coordinator as a real subprocess (``python -m coordinator``, uvloop), and its clients."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.payloads import register_json
from bench.procs import BenchError, Proc, Procs, free_port, pinned, python_argv


@dataclass
class Coordinator:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(procs: Procs, tmp: Path, core: int, name: str = "coordinator") -> Coordinator:
    port = free_port()
    state = tmp / f"{name}-state"
    env = {
        "COORDINATOR_HOST": "127.0.0.1",
        "COORDINATOR_PORT": str(port),
        "DEV_ALLOW_LOOPBACK": "true",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        "HEARTBEAT_INTERVAL": "3600",
        "REMOVE_AFTER": "100000",
        "COORDINATOR_STATE_DIR": str(state),
        "PYTHONUNBUFFERED": "1",
    }
    proc = procs.start(name, pinned(python_argv("-m", "coordinator"), core), env=env, port=port)
    coord = Coordinator(proc, port)
    wait_healthy(coord)
    return coord


def wait_healthy(coord: Coordinator, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{coord.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"coordinator not healthy: {last}\n{coord.proc.log_tail()}")


def health(coord: Coordinator) -> dict[str, object]:
    with urllib.request.urlopen(f"{coord.url}/health", timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


@dataclass
class Registered:
    credentials: list[tuple[str, str]]  # (worker_id, worker_token)
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.credentials) / self.seconds if self.seconds > 0 else 0.0


async def _register_many(
    base: str, count: int, tunnel_url: str, concurrency: int
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("", "")] * count
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def runner() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async with session.post(
                    f"{base}/api/worker/register",
                    data=register_json(i, tunnel_url),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"register answered {resp.status}: {body[:300]!r}")
                    reply = json.loads(body)
                    out[i] = (reply["worker_id"], reply["worker_token"])

        await asyncio.gather(*(runner() for _ in range(concurrency)))
    return out


def register_many(
    coord: Coordinator, count: int, tunnel_url: str, concurrency: int = 32
) -> Registered:
    started = time.perf_counter()
    creds = asyncio.run(_register_many(coord.url, count, tunnel_url, concurrency))
    return Registered(creds, time.perf_counter() - started)


def register_one(
    coord: Coordinator,
    tunnel_url: str,
    *,
    worker_id: str | None = None,
    worker_token: str | None = None,
) -> tuple[str, str]:
    """Register (or re-register, moving it to ``tunnel_url``) one worker."""
    body = json.loads(register_json(0, tunnel_url))
    if worker_id is not None:
        body["worker_id"] = worker_id
        body["worker_token"] = worker_token
    req = urllib.request.Request(
        f"{coord.url}/api/worker/register",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply = json.loads(resp.read())
    return reply["worker_id"], reply["worker_token"]
