"""Helpers for tests that run a federation behind the real router (``wrangler dev``).

``Edge`` runs ``rma-worker run`` in edge mode (a coordinator, its own compute worker and the fake
cloudflared, in one process group); ``stream_app`` is an SSE backend; ``wait_until`` polls an
async predicate; ``coordinators`` reads the router's ``/api/coordinators`` keyed by id.
Used by tests/e2e and tests/chaos.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from coordinator.settings import CoordinatorSettings
from tests.e2e.conftest import Router
from worker_agent.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
FAKE_CLOUDFLARED = ROOT / "tests" / "fake_cloudflared"
VENV_BIN = Path(sys.executable).parent
SETTING_NAMES = {n.upper() for n in WorkerSettings.model_fields} | {
    n.upper() for n in CoordinatorSettings.model_fields
}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any agent or coordinator setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(extra)
    return env


class Edge:
    """An edge coordinator process (its own process group: the agent and its cloudflared).

    ``interval`` is the coordinator's heartbeat interval for its workers; ``overrides`` replace
    any other setting (``FAILOVER_AFTER="1000"``...).
    """

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        router: Router,
        cf_state: Path,
        *,
        interval: float = 0.5,
        failover_after: int = 2,
        **overrides: str,
    ) -> None:
        self.log = tmp_path / f"{name}.log"
        env = clean_env(
            WORKER_TYPE="edge",
            EDGE_WORKER="true",
            COORDINATOR_URL=router.url,
            STATE_DIR=str(tmp_path / name),
            COORDINATOR_PORT="0",
            GATEWAY_PORT="0",
            CLOUDFLARED_PATH=str(FAKE_CLOUDFLARED),
            CLOUDFLARED_DOWNLOAD="false",
            FAKE_CLOUDFLARED_STATE=str(cf_state),
            AUTO_DETECT="false",
            DEV_ALLOW_LOOPBACK="true",
            CATALOG_ALLOW_UNLISTED="true",
            HEARTBEAT_INTERVAL=str(interval),
            HEARTBEAT_MIN_INTERVAL="0.05",
            SWEEP_INTERVAL="0.1",
            HTTP_TIMEOUT="2",
            REGISTER_BACKOFF_INITIAL="0.05",
            REGISTER_BACKOFF_MAX="0.5",
            TUNNEL_CHECK_INTERVAL="0.5",
            FAILOVER_AFTER=str(failover_after),
            DRAIN_TIMEOUT="2",
            LOG_FORMAT="json",
            LOG_LEVEL="info",
        )
        env.update(overrides)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "rma-worker"), "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole group: the coordinator and its tunnel die at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.kill()


def stream_app() -> web.Application:
    """A backend that streams ``n`` SSE tokens ``gap`` seconds apart."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await resp.write(f"data: token-{i}\n\n".encode())
            await asyncio.sleep(float(request.query.get("gap", "0.2")))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def wait_until(what: str, predicate: Callable[[], Any], timeout: float) -> float:
    """Poll ``await predicate()`` every 0.1 s until true; the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            if await predicate():
                return time.monotonic() - start
        except (aiohttp.ClientError, OSError, ValueError, KeyError):
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


def coordinators(router: Router) -> dict[str, dict[str, Any]]:
    """The router's ``/api/coordinators``, keyed by ``coordinator_id``."""
    return {c["coordinator_id"]: c for c in router.get_json("/api/coordinators")["coordinators"]}
