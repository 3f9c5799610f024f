"""Chaos fixtures: the agent suite's real coordinators, backends, fake cloudflared and process
reaper, plus helpers to run ``rma-worker`` / ``rma-coordinator`` as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.worker_agent.conftest import (  # noqa: F401 - fixtures re-exported for this suite
    agent_env,
    agents,
    cf_state,
    clean_env,
    coordinator_factory,
    free_port,
    reap,
    site_factory,
)

VENV_BIN = Path(sys.executable).parent
ADMIN = "admin-token-for-the-chaos-suite-0123456"


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes a test started; any still running at the end is killed (by pid) and reaped."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)


async def spawn(
    procs: list[asyncio.subprocess.Process], program: str, *args: str, env: dict[str, str]
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / program),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    procs.append(proc)
    return proc


def coordinator_env(tmp_path: Path, port: int, cid: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "COORDINATOR_HOST": "127.0.0.1",
            "COORDINATOR_PORT": str(port),
            "COORDINATOR_ID": cid,
            "COORDINATOR_STATE_DIR": str(tmp_path / cid),
            "DEV_ALLOW_LOOPBACK": "true",
            "CATALOG_ALLOW_UNLISTED": "true",
            "ADMIN_TOKEN": ADMIN,
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "json",
        }
    )
    env.update(overrides)
    return env


async def wait_http(url: str, limit_s: float = 10.0) -> None:
    """Until ``url`` answers at all (a process has started listening)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    await resp.read()
                    return
            except (aiohttp.ClientError, TimeoutError):
                if loop.time() > deadline:
                    raise AssertionError(f"{url} did not come up in {limit_s} s") from None
                await asyncio.sleep(0.05)


async def workers_view(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    async with http.get(
        f"{base}/api/workers", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    return {w["worker_id"]: w for w in data["workers"]}


Spawn = Callable[..., Awaitable[asyncio.subprocess.Process]]
