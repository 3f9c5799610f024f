"""Python time per proxied request on the front door's fast path (and per heartbeat), no sockets.

``python -m bench.hotpath [--requests N]`` prints one JSON line. A real coordinator app (one
registered worker) is driven in-process: a client connection's protocol and a pooled worker
connection get in-memory transports, and each request is the bytes wrk sends followed by the
bytes an nginx backend answers. What is timed is everything the coordinator's Python does per
request (parse, route, schedule, forward, relay, metrics) and none of the kernel's work, so
this figure moves with the code and much less with a noisy machine than a wrk run does; the
throughput benchmark (bench/scenarios.py) remains the figure that counts. A heartbeat (the
body the heartbeat benchmark sends, answered by a task, loop turns included) is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

from aiohttp import ClientSession, web

from bench.payloads import heartbeat_json, register_json

REQUEST = b"GET /service/echo/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 02:20:31 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n"
    b'{"ok":true}'
)
WORKER = ("http", "127.0.0.1", 9)  # never connected to: its pooled connection is in memory


class MemoryTransport:
    """The parts of a transport the front door and the upstream client use."""

    def __init__(self) -> None:
        self.last = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def measure(requests: int, rounds: int = 5) -> dict[str, float]:
    from coordinator.app import COORDINATOR, create_app
    from coordinator.frontdoor import FrontRunner, front_server
    from coordinator.settings import CoordinatorSettings
    from coordinator.upstream import _Connection

    with tempfile.TemporaryDirectory(prefix="rma-hotpath-") as state:
        settings = CoordinatorSettings(
            coordinator_host="127.0.0.1",
            coordinator_port=0,
            dev_allow_loopback=True,
            heartbeat_interval=3600,
            remove_after=100_000,
            coordinator_state_dir=state,
        )
        app = create_app(settings)
        runner = FrontRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            async with ClientSession() as session:
                resp = await session.post(
                    f"http://127.0.0.1:{port}/api/worker/register",
                    data=register_json(1, "http://127.0.0.1:9"),
                    headers={"Content-Type": "application/json"},
                )
                if resp.status != 200:
                    raise RuntimeError(f"registration failed: {await resp.text()}")
                reply = await resp.json()
            front = front_server(runner)
            pool = app[COORDINATOR].proxy._pool
            assert front is not None
            assert pool is not None
            loop = asyncio.get_running_loop()
            client = front()
            client_transport = MemoryTransport()
            client.connection_made(client_transport)  # type: ignore[arg-type]
            upstream = _Connection(loop)
            upstream.connection_made(MemoryTransport())  # type: ignore[arg-type]
            pool._put(WORKER, upstream, time.monotonic())  # an idle pooled connection

            async def run(n: int) -> float:
                started = time.perf_counter()
                for _ in range(n):
                    client.data_received(REQUEST)
                    upstream.data_received(RESPONSE)
                    await asyncio.sleep(0)  # what the event loop would do between requests
                return time.perf_counter() - started

            await run(2_000)
            if not client_transport.last.endswith(b'{"ok":true}'):
                raise RuntimeError(f"unexpected answer: {client_transport.last!r}")
            best = min([await run(requests) for _ in range(rounds)])

            async def idle(n: int) -> float:
                started = time.perf_counter()
                for _ in range(n):
                    await asyncio.sleep(0)
                return time.perf_counter() - started

            loop_turn = min([await idle(requests) for _ in range(rounds)])
            client.connection_lost(None)

            # A heartbeat: its body is read by a task, so the loop turns until it is answered.
            body = heartbeat_json(reply["worker_id"])
            beat = b"".join(
                (
                    b"POST /api/worker/heartbeat HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n",
                    b"Content-Type: application/json\r\n",
                    b"Authorization: Bearer %s\r\n" % reply["worker_token"].encode(),
                    b"Content-Length: %d\r\n\r\n" % len(body),
                    body,
                )
            )
            worker = front()
            worker_transport = MemoryTransport()
            worker.connection_made(worker_transport)  # type: ignore[arg-type]

            async def beats(n: int) -> float:
                started = time.perf_counter()
                for _ in range(n):
                    worker.data_received(beat)
                    while worker.task is not None:
                        await asyncio.sleep(0)
                return time.perf_counter() - started

            await beats(500)
            if not worker_transport.last.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"unexpected answer: {worker_transport.last[:300]!r}")
            beat_best = min([await beats(requests // 2) for _ in range(rounds)])
            worker.connection_lost(None)
        finally:
            await runner.cleanup()
    return {
        "us_per_request": (best - loop_turn) / requests * 1e6,
        "us_per_heartbeat": beat_best / (requests // 2) * 1e6,
        "loop_turn_us": loop_turn / requests * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--requests", type=int, default=40_000)
    args = parser.parse_args()
    from coordinator.logs import configure_logging

    configure_logging("warning", "json")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(measure(args.requests))))


if __name__ == "__main__":
    main()
