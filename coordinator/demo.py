"""``rma-coordinator demo`` (``make run`` until the worker agent lands).

Starts a coordinator on 127.0.0.1 and, beside it, a real echo worker: an aiohttp server on a free
loopback port that registers with the coordinator over HTTP, heartbeats it, and answers
``/service/echo/...`` with what it received. Every request therefore takes the real proxy path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import platform
import secrets
import signal
import socket
import sys

import aiohttp
import structlog
from aiohttp import web

from coordinator.app import create_app
from coordinator.frontdoor import FrontRunner
from coordinator.protocol import (
    GATEWAY_KEY_HEADER,
    REQUEST_ID_HEADER,
    Capabilities,
    ServiceOffer,
    WorkerHeartbeatRequest,
    WorkerHeartbeatResponse,
    WorkerRegisterRequest,
    WorkerRegisterResponse,
)
from coordinator.settings import CoordinatorSettings

log = structlog.get_logger("coordinator.demo")


def echo_app(gateway_key: str, worker_id: str) -> web.Application:
    """A worker gateway that serves only ``echo``, behind the gateway key."""

    async def echo(request: web.Request) -> web.Response:
        presented = request.headers.get(GATEWAY_KEY_HEADER, "").encode()
        if not hmac.compare_digest(presented, gateway_key.encode()):
            return web.json_response(
                {"error": "unauthorized", "detail": "bad gateway key"}, status=401
            )
        body = await request.read()
        return web.json_response(
            {
                "service": "echo",
                "method": request.method,
                "path": request.match_info["tail"],
                "query": request.query_string,
                "headers": {k: v for k, v in request.headers.items() if k != GATEWAY_KEY_HEADER},
                "body_bytes": len(body),
                "worker_id": worker_id,
                "request_id": request.headers.get(REQUEST_ID_HEADER),
            }
        )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "worker_id": worker_id})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/service/echo/{tail:.*}", echo)
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _demo_worker(coordinator_url: str, stop: asyncio.Event) -> None:
    gateway_key = secrets.token_urlsafe(24)
    worker_id = f"demo-{socket.gethostname()[:20] or 'local'}".replace("_", "-")
    port = _free_port()
    runner = web.AppRunner(echo_app(gateway_key, worker_id), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    register = WorkerRegisterRequest(
        worker_id=worker_id,
        worker_type="cpu",
        tunnel_url=f"http://127.0.0.1:{port}",
        gateway_key=gateway_key,
        capabilities=Capabilities(
            cpu_cores=max(1, len(os.sched_getaffinity(0))),
            os=platform.system().lower(),
            arch=platform.machine(),
            hostname=socket.gethostname()[:200],
        ),
        services=[ServiceOffer(name="echo", max_concurrency=64)],
        agent_version="demo",
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(
                f"{coordinator_url}/api/worker/register",
                data=register.model_dump_json(),
                headers={"Content-Type": "application/json"},
            ) as resp:
                reply = WorkerRegisterResponse.model_validate_json(await resp.read())
            log.info(
                "demo_worker_registered",
                worker_id=reply.worker_id,
                assigned=reply.assigned_services,
            )
            auth = {
                "Authorization": f"Bearer {reply.worker_token}",
                "Content-Type": "application/json",
            }
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), reply.heartbeat_interval)
                if stop.is_set():
                    break
                beat = WorkerHeartbeatRequest(worker_id=reply.worker_id)
                async with http.post(
                    f"{coordinator_url}/api/worker/heartbeat",
                    data=beat.model_dump_json(),
                    headers=auth,
                ) as resp:
                    WorkerHeartbeatResponse.model_validate_json(await resp.read())
            async with http.delete(f"{coordinator_url}/api/worker/{reply.worker_id}", headers=auth):
                pass
    finally:
        await runner.cleanup()


async def _run(settings: CoordinatorSettings) -> None:
    app = create_app(settings)
    runner = FrontRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.coordinator_host, settings.coordinator_port).start()
    base = f"http://127.0.0.1:{settings.coordinator_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = asyncio.create_task(_demo_worker(base, stop))
    await asyncio.sleep(0.3)
    summary = {
        "coordinator": base,
        "try": [
            f"curl {base}/service/echo/hello?x=1",
            f"curl {base}/api/services",
            f"curl {base}/health",
            f"open {base}/status",
        ],
    }
    log.info("demo_ready", **summary)
    sys.stdout.write(
        f"\nCoordinator on {base} with a demo echo worker registered. Try:\n"
        + "".join(f"  {line}\n" for line in summary["try"])
        + "Stop with Ctrl-C.\n\n"
    )
    sys.stdout.flush()
    await stop.wait()
    await worker
    await runner.cleanup()


def run_demo(settings: CoordinatorSettings) -> int:
    asyncio.run(_run(settings))
    return 0
