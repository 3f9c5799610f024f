"""The container health check follows the port the gateway really listens on."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

from tests.worker_agent.conftest import agent_settings
from worker_agent.agent import Agent
from worker_agent.healthcheck import FILE_NAME, health_url


async def run_check(state_dir: Path, gateway_port: int) -> int:
    """The check as the container runs it: a separate process (the gateway keeps serving)."""
    env = {"STATE_DIR": str(state_dir), "GATEWAY_PORT": str(gateway_port), "PATH": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker_agent.healthcheck",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 15)


async def test_the_check_follows_a_gateway_that_moved_to_a_free_port(
    tmp_path: Path, agents: list[Any]
) -> None:
    with socket.socket() as busy:  # GATEWAY_PORT is taken by something else
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        settings = agent_settings(tmp_path, gateway_port=taken, use_tunnel=False)
        agent = Agent(settings)
        agents.append(agent)
        await agent.start()
        assert agent.gateway is not None
        url = (settings.state_dir / FILE_NAME).read_text().strip()
        assert url != f"http://127.0.0.1:{taken}/health"
        assert url == health_url({"STATE_DIR": str(settings.state_dir)})
        assert (
            await run_check(settings.state_dir, taken) == 0
        )  # checks the real port, not GATEWAY_PORT
    await agent.shutdown()
    assert await run_check(settings.state_dir, taken) == 1  # nothing answers any more


def test_without_a_recorded_url_the_check_uses_gateway_port(tmp_path: Path) -> None:
    assert health_url({"STATE_DIR": str(tmp_path), "GATEWAY_PORT": "8123"}) == (
        "http://127.0.0.1:8123/health"
    )
    (tmp_path / FILE_NAME).write_text("http://169.254.169.254/latest/meta-data\n")
    assert health_url({"STATE_DIR": str(tmp_path)}) == "http://127.0.0.1:8000/health"
