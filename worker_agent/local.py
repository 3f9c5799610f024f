"""``rma-worker local`` (``make run``): a whole federation in one process, on loopback.

A coordinator on ``127.0.0.1:COORDINATOR_PORT`` (8080) that accepts loopback workers, and this
machine registered with it as a worker offering ``echo`` and any detected backends; no tunnel, no
internet. It prints what it started and a ``curl`` that goes through the whole chain.
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from worker_agent.agent import Agent
from worker_agent.embedded import EmbeddedCoordinator, coordinator_settings
from worker_agent.identity import IdentityStore, new_coordinator_id
from worker_agent.settings import WorkerSettings

log = structlog.get_logger("worker_agent.local")


class LocalStack:
    """An embedded coordinator and one agent registered with it."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings.model_copy(update={"use_tunnel": False, "tunnel_url": None})
        self.store = IdentityStore(settings.state_dir, settings.worker_id)
        self.coordinator: EmbeddedCoordinator | None = None
        self.agent: Agent | None = None

    async def start(self) -> None:
        identity = self.store.load()
        if identity.coordinator_id is None:
            identity.coordinator_id = new_coordinator_id()
            self.store.save(identity)
        csettings = coordinator_settings(
            self.settings.coordinator_port,
            coordinator_host="127.0.0.1",
            dev_allow_loopback=True,
            coordinator_state_dir=self.settings.state_dir.expanduser() / "coordinator",
        )
        self.coordinator = EmbeddedCoordinator(csettings, coordinator_id=identity.coordinator_id)
        url = await self.coordinator.start()
        self.agent = Agent(self.settings, coordinator_url=url, store=self.store, tunnel_mode="none")
        await self.agent.start()
        async with asyncio.timeout(max(5.0, self.settings.http_timeout)):
            await self.agent.registered.wait()

    def banner(self) -> str:
        assert self.coordinator is not None
        assert self.agent is not None
        base = self.coordinator.url
        reg = self.agent.registration
        assigned = ", ".join(reg.assigned_services) if reg else "-"
        gateway = self.agent.gateway.port if self.agent.gateway else 0
        lines = [
            "",
            "rma-worker local: a federation on this machine, nothing leaves 127.0.0.1",
            f"  coordinator  {base}  (id {self.coordinator.coordinator_id})",
            f"  worker       {self.agent.worker_id} ({self.agent.worker_type}), gateway "
            f"127.0.0.1:{gateway}",
            f"  services     {assigned}",
            "Try:",
            f"  curl {base}/service/echo/hello",
            f"  curl {base}/api/services",
            f"  curl {base}/health",
            f"  open {base}/status",
            "Stop with Ctrl-C.",
            "",
        ]
        return "\n".join(lines) + "\n"

    async def print_banner(self) -> None:
        sys.stdout.write(self.banner())
        sys.stdout.flush()

    async def shutdown(self) -> None:
        if self.agent is not None:
            await self.agent.shutdown()
        if self.coordinator is not None:
            await self.coordinator.stop()

    def abandon_drain(self) -> None:
        if self.agent is not None:
            self.agent.abandon_drain()
