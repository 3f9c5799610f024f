"""The compute worker's lifecycle: detect, serve, tunnel, register, beat, drain, leave.

1. Load (or create) the persisted identity; detect capabilities; find backends.
2. Start the local gateway, then the tunnel that points at it.
3. Register at ``COORDINATOR_URL`` (retrying with backoff and jitter, 1 → 60 s, never exiting).
4. Beat every ``heartbeat_interval`` to ``coordinator_url`` (or through the router). 404/401 →
   register again at once; ``FAILOVER_AFTER`` failures in a row → register again through
   ``COORDINATOR_URL``, which may pick another coordinator. A new tunnel URL → register again.
5. On SIGTERM/SIGINT: beat ``draining``, finish in-flight requests (``DRAIN_TIMEOUT``),
   unregister, stop the tunnel, exit 0.

Backend probes, tunnel watchdog and heartbeats are separate tasks: none can delay another.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import psutil
import structlog

from coordinator.protocol import (
    Capabilities,
    WorkerHeartbeatRequest,
    WorkerRegisterRequest,
    WorkerRegisterResponse,
    WorkerState,
    WorkerType,
)
from worker_agent import __version__
from worker_agent.backends import Backends
from worker_agent.capabilities import MIB, GpuMonitor, detect, resolve_worker_type
from worker_agent.client import ControlClient, ControlError, Rejected, Unreachable
from worker_agent.gateway import Gateway
from worker_agent.healthcheck import write_health_url
from worker_agent.identity import Identity, IdentityStore
from worker_agent.retry import retry_forever
from worker_agent.settings import WorkerSettings
from worker_agent.tunnel import Tunnel, TunnelMode

log = structlog.get_logger("worker_agent.agent")


def _http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class Agent:
    """One compute worker. ``start()``, then ``shutdown()``; safe to shut down half-started."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        coordinator_url: str | None = None,
        store: IdentityStore | None = None,
        gpus: GpuMonitor | None = None,
        tunnel_mode: TunnelMode | None = None,
    ) -> None:
        self.settings = settings
        self.coordinator_url = (coordinator_url or settings.coordinator_url).rstrip("/")
        self.store = store or IdentityStore(settings.state_dir, settings.worker_id)
        self.identity: Identity | None = None
        self.gateway_key = secrets.token_urlsafe(32)
        self.state: WorkerState = "active"
        self.worker_type: WorkerType = "cpu"
        self.capabilities = Capabilities()
        self.registration: WorkerRegisterResponse | None = None
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0
        self.interval = 15.0
        self.tunnel_url: str | None = None
        self.session: aiohttp.ClientSession | None = None
        self.client: ControlClient | None = None
        self.backends: Backends | None = None
        self.gateway: Gateway | None = None
        self.tunnel: Tunnel | None = None
        self._gpus = gpus
        self._own_gpus = gpus is None
        self._tunnel_mode = tunnel_mode
        self._reregister = asyncio.Event()
        self._control: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def worker_id(self) -> str:
        return self.identity.worker_id if self.identity else ""

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Everything up to the first registration attempt (which runs in the background)."""
        settings = self.settings
        self.identity = self.store.load()
        if self.identity.worker_token is None:
            # Proposed at registration and kept before it is sent: a lost reply cannot lock
            # this worker out of its own id.
            self.identity.worker_token = secrets.token_urlsafe(32)
            self.store.save(self.identity)
        structlog.contextvars.bind_contextvars(worker_id=self.identity.worker_id)
        self.session = aiohttp.ClientSession()
        self.client = ControlClient(self.session, settings.http_timeout)
        if self._gpus is None:
            self._gpus = await asyncio.to_thread(GpuMonitor)
        self.capabilities = await asyncio.to_thread(detect, settings.state_dir, self._gpus)
        role = "auto" if settings.worker_type == "edge" else settings.worker_type
        self.worker_type = resolve_worker_type(role, self.capabilities)

        own = (f"http://127.0.0.1:{settings.gateway_port}",)
        self.backends = Backends(settings, own_urls=own)
        await self.backends.autodetect(self.session)
        await self.backends.probe_all(self.session)

        self.gateway = Gateway(settings, self.backends, self.gateway_key, lambda: self.worker_id)
        mode = self._tunnel_mode or Tunnel.mode_for(settings)
        port = await self.gateway.start(
            settings.gateway_host,
            settings.gateway_port,
            fallback_to_free_port=mode != "none" or settings.tunnel_url is None,
        )
        host = settings.gateway_host
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if local_host == "127.0.0.1":
            write_health_url(settings.state_dir, port)  # the container's health check reads it
        self.tunnel = Tunnel(
            settings,
            local_url=f"http://{local_host}:{port}",
            session=self.session,
            on_change=self._tunnel_changed,
            mode=mode,
        )
        self.tunnel_url = await self.tunnel.start()
        self._tasks.append(asyncio.create_task(self.backends.watch(self.session), name="backends"))
        self._tasks.append(asyncio.create_task(self.tunnel.watch(), name="tunnel-watchdog"))
        self._control = asyncio.create_task(self._control_loop(), name="control")
        log.info(
            "agent_started",
            worker_type=self.worker_type,
            gateway_port=port,
            tunnel=mode,
            tunnel_url=self.tunnel_url,
            services=[b.name for b in self.backends.by_name.values()],
            gpus=len(self.capabilities.gpus),
        )

    async def _tunnel_changed(self, url: str) -> None:
        self.tunnel_url = url
        self._reregister.set()

    # ------------------------------------------------------------------ registration

    def _register_request(self) -> WorkerRegisterRequest:
        assert self.identity is not None
        assert self.backends is not None
        assert self.tunnel_url is not None
        with contextlib.suppress(Exception):
            available = psutil.virtual_memory().available // MIB
            self.capabilities = self.capabilities.model_copy(update={"ram_available_mb": available})
        return WorkerRegisterRequest(
            worker_id=self.identity.worker_id,
            worker_token=self.identity.worker_token,
            worker_type=self.worker_type,
            tunnel_url=self.tunnel_url,
            gateway_key=self.gateway_key,
            capabilities=self.capabilities,
            services=self.backends.offers(),
            agent_version=__version__,
        )

    async def _register_once(self) -> None:
        assert self.client is not None
        assert self.identity is not None
        join = self.settings.worker_join_token
        reply = await self.client.register(
            self.coordinator_url,
            self._register_request(),
            join.get_secret_value() if join else None,
        )
        self._accept(reply)

    def _accept(self, reply: WorkerRegisterResponse) -> None:
        assert self.identity is not None
        assert self.gateway is not None
        if reply.worker_id != self.identity.worker_id:
            log.warning("worker_id_assigned", old=self.identity.worker_id, new=reply.worker_id)
            self.identity.worker_id = reply.worker_id
            structlog.contextvars.bind_contextvars(worker_id=reply.worker_id)
        if reply.worker_token != self.identity.worker_token:
            self.identity.worker_token = reply.worker_token
        self.store.save(self.identity)
        self.registration = reply
        self.gateway.assigned = frozenset(reply.assigned_services)
        self.interval = self.settings.beat_interval(reply.heartbeat_interval)
        self.registrations += 1
        self.registered.set()
        log.info(
            "worker_registered",
            coordinator_id=reply.coordinator_id,
            assigned=reply.assigned_services,
            heartbeat_interval=self.interval,
            tunnel_url=self.tunnel_url,
        )

    async def _register(self, reason: str) -> None:
        log.info("registering", reason=reason, at=self.coordinator_url)
        await retry_forever(
            self._register_once,
            what="register",
            initial=self.settings.register_backoff_initial,
            maximum=self.settings.register_backoff_max,
            retry_on=(ControlError,),
        )

    # ------------------------------------------------------------------ heartbeats

    def _beat_target(self) -> str:
        reg = self.registration
        if self.settings.heartbeat_via == "router" or reg is None:
            return self.coordinator_url
        url = reg.coordinator_url.rstrip("/")
        return url if _http_url(url) else self.coordinator_url

    def _beat_request(self) -> WorkerHeartbeatRequest:
        assert self.gateway is not None
        assert self.backends is not None
        assert self.identity is not None
        assert self.registration is not None
        memory = psutil.virtual_memory()
        return WorkerHeartbeatRequest(
            worker_id=self.identity.worker_id,
            coordinator_id=self.registration.coordinator_id,
            state=self.state,
            active_requests=self.gateway.in_flight,
            cpu_pct=min(max(psutil.cpu_percent(interval=None), 0.0), 100.0),
            ram_available_mb=memory.available // MIB,
            gpus=self._gpus.load() if self._gpus is not None else [],
            services=self.backends.health(),
        )

    async def beat(self, limit_s: float | None = None) -> None:
        """Send one heartbeat; raises :class:`ControlError`."""
        assert self.client is not None
        assert self.identity is not None
        assert self.identity.worker_token is not None
        assert self.gateway is not None
        reply = await self.client.heartbeat(
            self._beat_target(), self._beat_request(), self.identity.worker_token, limit_s
        )
        self.heartbeats += 1
        self.gateway.assigned = frozenset(reply.assigned_services)
        self.interval = self.settings.beat_interval(reply.heartbeat_interval)

    async def _control_loop(self) -> None:
        await self._register("start")
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._reregister.wait()
            if self._reregister.is_set():
                self._reregister.clear()
                await self._register("tunnel_url_changed")
                failures = 0
                continue
            try:
                await self.beat()
                failures = 0
            except Rejected as exc:
                if exc.status in (401, 404):
                    log.info("heartbeat_refused", status=exc.status, error=exc.code)
                    await self._register(f"heartbeat_{exc.status}")
                    failures = 0
                else:
                    failures += 1
                    log.warning("heartbeat_rejected", error=str(exc), failures=failures)
            except Unreachable as exc:
                failures += 1
                log.warning(
                    "heartbeat_failed",
                    error=str(exc),
                    failures=failures,
                    failover_after=self.settings.failover_after,
                )
            if failures >= self.settings.failover_after:
                failures = 0
                await self._register("failover")

    # ------------------------------------------------------------------ shutdown

    def abandon_drain(self) -> None:
        """A second signal: stop waiting for in-flight requests."""
        if self.gateway is not None:
            self.gateway.abandon_drain()

    async def shutdown(self) -> None:
        """Drain, unregister, stop the tunnel and the gateway. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.state = "draining"
        if self.gateway is not None:
            self.gateway.draining = True
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control
        registered = self.registration is not None and self.client is not None
        if registered:
            try:
                await self.beat(limit_s=min(self.settings.http_timeout, 5.0))
                log.info("draining", in_flight=self.gateway.in_flight if self.gateway else 0)
            except ControlError as exc:
                log.warning("draining_beat_failed", error=str(exc))
        if self.gateway is not None and not await self.gateway.wait_idle(
            self.settings.drain_timeout
        ):
            log.warning(
                "drain_timeout",
                in_flight=self.gateway.in_flight,
                after_s=self.settings.drain_timeout,
            )
        if registered:
            await self._unregister()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tunnel is not None:
            await self.tunnel.stop()
        if self.gateway is not None:
            await self.gateway.close()
        if self.session is not None:
            await self.session.close()
        if self._gpus is not None and self._own_gpus:
            self._gpus.close()
        log.info("agent_stopped")

    async def _unregister(self) -> None:
        assert self.client is not None
        assert self.identity is not None
        token = self.identity.worker_token
        if token is None:
            return
        try:
            await self.client.unregister(self._unregister_target(), self.identity.worker_id, token)
            log.info("unregistered")
        except ControlError as exc:
            log.warning("unregister_failed", error=str(exc))

    def _unregister_target(self) -> str:
        reg = self.registration
        if reg is not None and _http_url(reg.coordinator_url):
            return reg.coordinator_url.rstrip("/")
        return self.coordinator_url


def install_signal_handlers(first: Callable[[], None], second: Callable[[], None]) -> None:
    """SIGTERM/SIGINT: ``first`` on the first one, ``second`` on any later one."""
    loop = asyncio.get_running_loop()
    count = 0

    def handler() -> None:
        nonlocal count
        count += 1
        (first if count == 1 else second)()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)


class Component(Protocol):
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def abandon_drain(self) -> None: ...


async def serve(agent: Component, on_started: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run ``agent`` until SIGTERM/SIGINT, then shut it down (start-up can be interrupted)."""
    stop = asyncio.Event()
    install_signal_handlers(stop.set, agent.abandon_drain)
    starting = asyncio.create_task(agent.start(), name="agent-start")
    waiting = asyncio.create_task(stop.wait(), name="stop-wait")
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # start-up errors propagate (after the shutdown below)
            if on_started is not None:
                await on_started()
            await waiting
    finally:
        waiting.cancel()
        await agent.shutdown()
