"""A coordinator running inside the agent's process (edge mode and ``rma-worker local``)."""

from __future__ import annotations

import structlog
from aiohttp import web

from coordinator.app import create_app
from coordinator.frontdoor import FrontRunner
from coordinator.settings import CoordinatorSettings

log = structlog.get_logger("worker_agent.embedded")


def coordinator_settings(port: int, **overrides: object) -> CoordinatorSettings:
    """Coordinator settings from the environment, on ``port``.

    Without an explicit ``COORDINATOR_HOST`` it listens on loopback only: the tunnel (or the
    local user) reaches it there, and nothing else on the network can.
    """
    base = CoordinatorSettings()
    update: dict[str, object] = {"coordinator_port": port}
    if "coordinator_host" not in base.model_fields_set:
        update["coordinator_host"] = "127.0.0.1"
    update.update(overrides)
    return base.model_copy(update=update)


class EmbeddedCoordinator:
    """``create_app`` served by an aiohttp runner; ``start()`` returns its loopback URL."""

    def __init__(self, settings: CoordinatorSettings, *, coordinator_id: str) -> None:
        self.settings = settings
        self.coordinator_id = coordinator_id
        self.app = create_app(settings, coordinator_id=coordinator_id)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        self._runner = FrontRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.settings.coordinator_host, self.settings.coordinator_port
        )
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])
        log.info(
            "embedded_coordinator_started",
            coordinator_id=self.coordinator_id,
            host=self.settings.coordinator_host,
            port=self.port,
        )
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
