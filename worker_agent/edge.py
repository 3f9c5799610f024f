"""Edge mode (``WORKER_TYPE=edge``): the first edge worker is the coordinator.

Runs a coordinator in-process on ``COORDINATOR_PORT`` (or fronts the one at
``LOCAL_COORDINATOR_URL``), opens a tunnel to it (or reads the compose stack's quick-tunnel
hostname from ``TUNNEL_METRICS_URL``), registers it at the router (``POST /api/edge/register``)
with its persisted ``coordinator_id``, and beats the router with the coordinator's summary. A 404
means the router forgot it: it registers again at once. With no router configured
(``COORDINATOR_URL=""``) or reachable it serves standalone and keeps retrying. On SIGTERM it
tells the router it is draining and deregisters. With ``EDGE_WORKER=true`` this machine is also a
compute worker of its own coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from urllib.parse import urlsplit

import aiohttp
import structlog

from coordinator.protocol import (
    EdgeHeartbeatRequest,
    EdgeRegisterRequest,
    EdgeServiceSummary,
    WorkerState,
)
from coordinator.settings import CoordinatorSettings
from worker_agent import __version__
from worker_agent.agent import Agent
from worker_agent.client import ControlClient, ControlError, Rejected, Unreachable
from worker_agent.embedded import EmbeddedCoordinator, coordinator_settings
from worker_agent.healthcheck import write_health_url
from worker_agent.identity import IdentityStore, new_coordinator_id
from worker_agent.retry import retry_forever
from worker_agent.settings import WorkerSettings
from worker_agent.tunnel import Tunnel

log = structlog.get_logger("worker_agent.edge")


class EdgeAgent:
    """An edge coordinator and its registration at the router."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        coordinator: CoordinatorSettings | None = None,
        store: IdentityStore | None = None,
    ) -> None:
        self.settings = settings
        self.router = settings.coordinator_url.rstrip("/")
        self.store = store or IdentityStore(settings.state_dir, settings.worker_id)
        self._coordinator_settings = coordinator
        self.coordinator_id = ""
        self.local_url = ""
        self.tunnel_url: str | None = None
        self.state: WorkerState = "active"
        self.interval = 15.0
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self.embedded: EmbeddedCoordinator | None = None
        self.tunnel: Tunnel | None = None
        self.worker: Agent | None = None
        self.session: aiohttp.ClientSession | None = None
        self.client: ControlClient | None = None
        self._max_inflight = 180
        self._reregister = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> None:
        settings = self.settings
        identity = self.store.load()
        self.session = aiohttp.ClientSession()
        self.client = ControlClient(self.session, settings.http_timeout)
        if settings.local_coordinator_url:
            self.local_url = settings.local_coordinator_url
            health = await retry_forever(
                lambda: self._client.health(self.local_url),
                what="local_coordinator",
                initial=settings.register_backoff_initial,
                maximum=settings.register_backoff_max,
                retry_on=(ControlError,),
            )
            self.coordinator_id = health.coordinator_id
            self._max_inflight = CoordinatorSettings().max_inflight
        else:
            if identity.coordinator_id is None:
                identity.coordinator_id = new_coordinator_id()
                self.store.save(identity)
            self.coordinator_id = identity.coordinator_id
            csettings = self._coordinator_settings or coordinator_settings(
                settings.coordinator_port
            )
            self._max_inflight = csettings.max_inflight
            self.embedded = EmbeddedCoordinator(csettings, coordinator_id=self.coordinator_id)
            self.local_url = await self.embedded.start()
            write_health_url(settings.state_dir, urlsplit(self.local_url).port or 80)
        structlog.contextvars.bind_contextvars(coordinator_id=self.coordinator_id)

        self.tunnel = Tunnel(
            settings, local_url=self.local_url, session=self.session, on_change=self._url_changed
        )
        self.tunnel_url = await self.tunnel.start()
        self._tasks.append(asyncio.create_task(self.tunnel.watch(), name="edge-tunnel-watchdog"))
        if self.router:
            self._tasks.append(asyncio.create_task(self._router_loop(), name="edge-router"))
        else:
            log.info("edge_standalone", reason="COORDINATOR_URL is empty: no router")
        if settings.edge_worker:
            self.worker = Agent(
                self._worker_settings(),
                coordinator_url=self.local_url,
                store=self.store,
                tunnel_mode="quick" if settings.use_tunnel else "none",
            )
            await self.worker.start()
        log.info(
            "edge_started",
            local_url=self.local_url,
            tunnel_url=self.tunnel_url,
            router=self.router or None,
            worker=self.worker is not None,
        )

    def _worker_settings(self) -> WorkerSettings:
        """The compute worker's settings: its gateway needs a tunnel of its own.

        ``TUNNEL_TOKEN``/``TUNNEL_URL``/``TUNNEL_METRICS_URL`` describe the coordinator's tunnel;
        a worker that advertised that URL would have the coordinator proxy to itself.
        """
        return self.settings.model_copy(
            update={"tunnel_token": None, "tunnel_url": None, "tunnel_metrics_url": None}
        )

    @property
    def _client(self) -> ControlClient:
        assert self.client is not None
        return self.client

    async def _url_changed(self, url: str) -> None:
        self.tunnel_url = url
        self._reregister.set()

    # ------------------------------------------------------------------ router

    def _follow_local_id(self, coordinator_id: str) -> bool:
        """Fronted mode: adopt the id the local coordinator reports now; ``True`` if it changed.

        A compose coordinator recreated without its state volume comes back with a new id; the
        router checks that the tunnel serves the id being registered, so the old one would be
        refused forever.
        """
        if not self.settings.local_coordinator_url or coordinator_id == self.coordinator_id:
            return False
        log.warning("local_coordinator_id_changed", old=self.coordinator_id, new=coordinator_id)
        self.coordinator_id = coordinator_id
        structlog.contextvars.bind_contextvars(coordinator_id=coordinator_id)
        return True

    async def _register_once(self) -> None:
        if self.settings.local_coordinator_url:
            self._follow_local_id((await self._client.health(self.local_url)).coordinator_id)
        identity = self.store.load()
        if identity.coordinator_secret is None:
            # Proposed to the router and kept before it is sent: a lost reply cannot lock this
            # coordinator out of its own id.
            identity.coordinator_secret = secrets.token_urlsafe(32)
            self.store.save(identity)
        assert self.tunnel_url is not None
        token = self.settings.federation_join_token
        reply = await self._client.edge_register(
            self.router,
            EdgeRegisterRequest(
                coordinator_id=self.coordinator_id,
                tunnel_url=self.tunnel_url,
                coordinator_secret=identity.coordinator_secret,
                version=__version__,
            ),
            token.get_secret_value() if token else None,
        )
        identity.coordinator_secret = reply.coordinator_secret
        self.store.save(identity)
        self.interval = self.settings.beat_interval(reply.heartbeat_interval)
        self.registrations += 1
        self.registered.set()
        log.info(
            "edge_registered",
            router=self.router,
            tunnel_url=self.tunnel_url,
            interval=self.interval,
        )

    async def _register(self, reason: str) -> None:
        log.info("edge_registering", reason=reason, router=self.router)
        await retry_forever(
            self._register_once,
            what="edge_register",
            initial=self.settings.register_backoff_initial,
            maximum=self.settings.register_backoff_max,
            retry_on=(ControlError,),
        )

    async def summary(self) -> EdgeHeartbeatRequest:
        """The coordinator's workers, services and load, read from its own API."""
        health = await self._client.health(self.local_url)
        if self._follow_local_id(health.coordinator_id):
            raise Rejected(
                "the local coordinator's id changed", status=404, code="coordinator_id_changed"
            )
        services = await self._client.services(self.local_url)
        return EdgeHeartbeatRequest(
            coordinator_id=self.coordinator_id,
            state=self.state,
            workers=health.workers.total,
            services=[
                EdgeServiceSummary(
                    name=s.name,
                    ready_workers=s.ready_workers,
                    models=s.models[:512],
                    aliases=s.aliases[:16],
                )
                for s in services.services
                if s.workers > 0
            ][:512],
            load=min(1.0, health.in_flight / max(1, self._max_inflight)),
            in_flight=health.in_flight,
        )

    async def beat(self) -> None:
        secret = self.store.load().coordinator_secret
        if secret is None:
            raise Rejected("no coordinator secret yet", status=404, code="unknown_coordinator")
        await self._client.edge_heartbeat(self.router, await self.summary(), secret)
        self.heartbeats += 1

    async def _router_loop(self) -> None:
        await self._register("start")
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._reregister.wait()
            if self._reregister.is_set():
                self._reregister.clear()
                await self._register("tunnel_url_changed")
                continue
            try:
                await self.beat()
                failures = 0
            except Rejected as exc:
                if exc.status in (401, 404):
                    log.info("edge_heartbeat_refused", status=exc.status, error=exc.code)
                    await self._register(f"heartbeat_{exc.status}")
                else:
                    log.warning("edge_heartbeat_rejected", error=str(exc))
            except Unreachable as exc:
                failures += 1
                log.warning("edge_heartbeat_failed", error=str(exc), failures=failures)
                if failures >= self.settings.failover_after:
                    failures = 0
                    await self._register("router_unreachable")

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.state = "draining"
        if self.worker is not None:
            await self.worker.shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        secret = self.store.load().coordinator_secret
        if self.router and self.registered.is_set() and secret is not None:
            try:
                await self.beat()
                await self._client.edge_unregister(self.router, self.coordinator_id, secret)
                log.info("edge_deregistered", router=self.router)
            except ControlError as exc:
                log.warning("edge_deregister_failed", error=str(exc))
        if self.tunnel is not None:
            await self.tunnel.stop()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.session is not None:
            await self.session.close()
        log.info("edge_stopped")

    def abandon_drain(self) -> None:
        if self.worker is not None:
            self.worker.abandon_drain()
