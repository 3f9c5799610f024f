"""The coordinator's aiohttp application: control plane, public views and the proxy route."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from coordinator import __version__
from coordinator.catalog import Catalog
from coordinator.errors import (
    BadRequest,
    bearer,
    bearer_token,
    error_body,
    json_error,
    parse_model,
    read_capped,
    response_parts,
)
from coordinator.metrics import CONTENT_TYPE, Metrics
from coordinator.openapi import openapi_document
from coordinator.protocol import (
    ID_PATTERN,
    PROTOCOL_VERSION,
    HealthResponse,
    ServicesResponse,
    WorkerHealth,
    WorkerHeartbeatRequest,
    WorkerRegisterRequest,
    WorkerRegisterResponse,
    WorkersResponse,
)
from coordinator.proxy import Proxy
from coordinator.registry import (
    Forbidden,
    Registry,
    RegistryError,
    UnknownWorker,
    WorkerRecord,
    token_matches,
)
from coordinator.settings import CoordinatorSettings
from coordinator.status_page import render_status
from coordinator.urls import InvalidTunnelURL, public_url, request_host, validate_tunnel_url

log = structlog.get_logger("coordinator")

_ID = re.compile(ID_PATTERN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Coordinator:
    """Holds the state of one coordinator; its methods are the HTTP handlers."""

    def __init__(self, settings: CoordinatorSettings, *, coordinator_id: str) -> None:
        self.settings = settings
        self.coordinator_id = coordinator_id
        self.started = time.monotonic()
        self.catalog = Catalog.load(
            settings.service_catalog_file, allow_unlisted=settings.catalog_allow_unlisted
        )
        self.registry = Registry(
            self.catalog,
            suspect_after_s=settings.suspect_after_s,
            remove_after_s=settings.remove_after,
            strike_limit=settings.strike_limit,
            max_workers=settings.max_workers,
            max_services_per_worker=settings.max_services_per_worker,
        )
        self.metrics = Metrics()
        self.proxy = Proxy(self.registry, settings, self.metrics)
        self.metrics.bind(self.registry, lambda: self.proxy.in_flight)
        self.registry.on_removed = self._on_removed
        self._register_bucket = _Bucket(settings.register_rate_limit)
        self._join = _secret(settings.worker_join_token)
        self._admin = _secret(settings.admin_token)

    # ------------------------------------------------------------------ helpers

    def _on_removed(self, record: WorkerRecord, reason: str) -> None:
        self.metrics.removals.labels(reason).inc()
        log.info("worker_removed", worker_id=record.worker_id, reason=reason)

    def public_url(self, request: web.Request) -> str:
        """This coordinator's URL as ``request`` shows it (:func:`coordinator.urls.public_url`)."""
        transport = request.transport
        return public_url(
            self.settings.coordinator_public_url,
            scheme=request.scheme,
            forwarded_proto=request.headers.get("X-Forwarded-Proto"),
            host=request_host(
                request.headers.get("Host"),
                transport.get_extra_info("sockname") if transport is not None else None,
            ),
        )

    def _is_admin(self, request: web.Request) -> bool:
        return self._admin is not None and _matches(bearer(request), self._admin)

    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise BadRequest(
                json_error(
                    400,
                    "unsupported_protocol_version",
                    f"this coordinator speaks protocol_version {PROTOCOL_VERSION}",
                )
            )

    # ------------------------------------------------------------------ control plane

    async def register(self, request: web.Request) -> web.Response:
        body = await read_capped(
            request, self.settings.max_control_body, self.settings.client_read_timeout
        )
        answer = self.answer_register(
            body, request.headers.get("Authorization"), self.public_url(request)
        )
        return _parts_response(*answer)

    def answer_register(
        self, body: bytes, authorization: str | None, coordinator_url: str
    ) -> tuple[int, bytes, dict[str, str]]:
        """A registration's answer: status, JSON body and extra headers.

        The one implementation behind ``POST /api/worker/register``, whether aiohttp or the
        front door (:mod:`coordinator.frontdoor`) read the request; both read the body first
        (capped at ``MAX_CONTROL_BODY``, 413, and ``CLIENT_READ_TIMEOUT``, 408).
        ``coordinator_url`` is the request's :func:`coordinator.urls.public_url`.
        """
        if self._join is not None and not _matches(bearer_token(authorization), self._join):
            self.metrics.registrations.labels("unauthorized").inc()
            return (
                401,
                error_body(
                    "unauthorized",
                    "registration needs the federation's join token (Authorization: Bearer ...)",
                ),
                {"WWW-Authenticate": "Bearer"},
            )
        if not self._register_bucket.take():
            self.metrics.registrations.labels("shed").inc()
            return (
                503,
                error_body(
                    "register_busy",
                    "too many registrations right now; retry after the Retry-After delay",
                ),
                {"Retry-After": str(self.settings.retry_after)},
            )
        try:
            req = parse_model(WorkerRegisterRequest, body)
            self._check_version(req.protocol_version)
        except BadRequest as exc:
            return response_parts(exc.response)
        try:
            tunnel_url = validate_tunnel_url(
                req.tunnel_url,
                self.settings.allowed_tunnel_suffixes,
                allow_loopback=self.settings.dev_allow_loopback,
            )
        except InvalidTunnelURL as exc:
            self.metrics.registrations.labels("invalid_tunnel_url").inc()
            return 422, error_body("invalid_tunnel_url", str(exc)), {}
        try:
            reg = self.registry.register(req, tunnel_url, new_id=_new_worker_id)
        except RegistryError as exc:
            self.metrics.registrations.labels(exc.code).inc()
            status = 403 if isinstance(exc, Forbidden) else 503
            return status, error_body(exc.code, str(exc)), {}
        record = reg.worker
        self.metrics.registrations.labels("replaced" if reg.replaced else "new").inc()
        log.info(
            "worker_registered",
            worker_id=record.worker_id,
            worker_type=record.worker_type,
            services=list(record.slots),
            assigned=record.assigned,
            replaced=reg.replaced,
        )
        reply = WorkerRegisterResponse(
            worker_id=record.worker_id,
            worker_token=reg.worker_token,
            coordinator_id=self.coordinator_id,
            coordinator_url=coordinator_url,
            assigned_services=record.assigned,
            heartbeat_interval=self.settings.heartbeat_interval,
        )
        return 200, reply.model_dump_json().encode(), {}

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await read_capped(
            request, self.settings.max_control_body, self.settings.client_read_timeout
        )
        return _parts_response(*self.answer_heartbeat(body, request.headers.get("Authorization")))

    def answer_heartbeat(
        self, body: bytes, authorization: str | None
    ) -> tuple[int, bytes, dict[str, str]]:
        """A heartbeat's answer: status, JSON body and extra headers.

        The one implementation behind ``POST /api/worker/heartbeat``, whether aiohttp or the
        front door (:mod:`coordinator.frontdoor`) read the request; both read the body first
        (capped at ``MAX_CONTROL_BODY``, 413, and ``CLIENT_READ_TIMEOUT``, 408).
        """
        try:
            beat = parse_model(WorkerHeartbeatRequest, body)
            self._check_version(beat.protocol_version)
        except BadRequest as exc:
            return response_parts(exc.response)
        if beat.coordinator_id is not None and beat.coordinator_id != self.coordinator_id:
            self.metrics.heartbeats.labels("unknown").inc()
            return (
                404,
                error_body(
                    "unknown_worker",
                    f"this is coordinator {self.coordinator_id!r}, not {beat.coordinator_id!r}; "
                    "register again",
                ),
                {},
            )
        try:
            record = self.registry.authenticate(beat.worker_id, bearer_token(authorization))
        except UnknownWorker as exc:
            self.metrics.heartbeats.labels("unknown").inc()
            return 404, error_body(exc.code, str(exc)), {}
        except Forbidden as exc:
            self.metrics.heartbeats.labels("unauthorized").inc()
            return 401, error_body("unauthorized", str(exc)), {"WWW-Authenticate": "Bearer"}
        self.registry.heartbeat(record, beat)
        self.metrics.heartbeat_ok()
        reply = heartbeat_reply(
            record.worker_id,
            self.coordinator_id,
            record.health(self.registry.strike_limit),
            record.assigned,
            self.settings.heartbeat_interval,
        )
        return 200, reply, {}

    async def unregister(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        if not _ID.match(worker_id):
            return json_error(400, "invalid_worker_id", f"worker ids match {ID_PATTERN}")
        record = self.registry.get(worker_id)
        if record is None:
            return json_error(404, "unknown_worker", f"worker {worker_id!r} is not registered")
        if not (self._is_admin(request) or _token_ok(record, bearer(request))):
            return json_error(
                401,
                "unauthorized",
                "unregistering needs the worker's token or the admin token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self.registry.remove(worker_id, "unregistered")
        return _json(f'{{"removed":"{worker_id}"}}')

    # ------------------------------------------------------------------ views

    async def services(self, request: web.Request) -> web.Response:
        reply = ServicesResponse(
            coordinator_id=self.coordinator_id, services=self.registry.services_summary()
        )
        return _json(reply.model_dump_json())

    async def workers(self, request: web.Request) -> web.Response:
        if self._admin is None:
            return json_error(403, "admin_disabled", "set ADMIN_TOKEN to enable admin endpoints")
        if not self._is_admin(request):
            return json_error(
                401, "unauthorized", "needs the admin token", headers={"WWW-Authenticate": "Bearer"}
            )
        reply = WorkersResponse(coordinator_id=self.coordinator_id, workers=self.registry.views())
        return _json(reply.model_dump_json())

    def health_model(self) -> HealthResponse:
        return HealthResponse(
            coordinator_id=self.coordinator_id,
            version=__version__,
            uptime_s=round(time.monotonic() - self.started, 3),
            workers=self.registry.counts(),
            in_flight=self.proxy.in_flight,
            services=self.registry.ready_counts(),
        )

    async def health(self, request: web.Request) -> web.Response:
        return _json(self.health_model().model_dump_json())

    async def metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def status(self, request: web.Request) -> web.Response:
        page = render_status(self.health_model(), self.registry)
        return web.Response(text=page, content_type="text/html")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(__version__))

    # ------------------------------------------------------------------ lifecycle

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            suspected, _removed = self.registry.sweep()
            for record in suspected:
                log.info("worker_suspect", worker_id=record.worker_id, reason="missed_heartbeats")

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.proxy.start()
        task = asyncio.create_task(self._sweeper(), name="registry-sweeper")
        log.info(
            "coordinator_started",
            coordinator_id=self.coordinator_id,
            version=__version__,
            heartbeat_interval=self.settings.heartbeat_interval,
            join_token=self._join is not None,
            admin_token=self._admin is not None,
            catalog=[s.name for s in self.catalog],
        )
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.proxy.close()
            log.info("coordinator_stopped", coordinator_id=self.coordinator_id)


COORDINATOR = web.AppKey("coordinator", Coordinator)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answers JSON: bad input 4xx with details, never a bare 500."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return exc.response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(exc.status, code, f"{request.method} {request.path}", headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal_error", path=request.path)
        return json_error(500, "internal_error", "the coordinator failed; this is a bug")


def create_app(
    settings: CoordinatorSettings | None = None, *, coordinator_id: str | None = None
) -> web.Application:
    settings = settings or CoordinatorSettings()
    cid = (
        coordinator_id
        or settings.coordinator_id
        or load_coordinator_id(settings.coordinator_state_dir)
    )
    coordinator = Coordinator(settings, coordinator_id=cid)
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=max(settings.max_model_sniff_body, settings.max_control_body),
        # keepalive_timeout also bounds the time to send request headers (slowloris): aiohttp
        # closes a connection still waiting for a complete request when it fires.
        handler_args={"max_field_size": 16_384, "keepalive_timeout": settings.client_read_timeout},
    )
    app[COORDINATOR] = coordinator
    app.cleanup_ctx.append(coordinator.lifecycle)
    r = app.router
    r.add_post("/api/worker/register", coordinator.register)
    r.add_post("/api/worker/heartbeat", coordinator.heartbeat)
    r.add_delete("/api/worker/{worker_id}", coordinator.unregister)
    r.add_get("/api/services", coordinator.services)
    r.add_get("/api/workers", coordinator.workers)
    r.add_get("/health", coordinator.health)
    r.add_get("/metrics", coordinator.metrics_view)
    r.add_get("/status", coordinator.status)
    r.add_get("/openapi.json", coordinator.openapi)
    r.add_route("*", "/service/{name}", coordinator.proxy.handle)
    r.add_route("*", "/service/{name}/{tail:.*}", coordinator.proxy.handle)
    return app


def load_coordinator_id(state_dir: Path) -> str:
    """The persisted coordinator id, generated on first use. Falls back to a random one."""
    path = state_dir.expanduser() / "coordinator_id"
    try:
        value = path.read_text(encoding="utf-8").strip()
        if _ID.match(value):
            return value
    except OSError:
        pass
    value = f"coord-{secrets.token_hex(6)}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("coordinator_id_not_persisted", path=str(path), error=str(exc))
    return value


class _Bucket:
    """A token bucket of ``rate`` per second (burst: one second's worth); rate 0 never refuses."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def _new_worker_id() -> str:
    return f"w-{secrets.token_hex(6)}"


def _secret(value: object) -> bytes | None:
    raw = getattr(value, "get_secret_value", lambda: None)()
    return raw.encode("utf-8") if raw else None


def _matches(presented: str | None, expected: bytes) -> bool:
    candidate = presented.encode("utf-8") if presented else b""
    return hmac.compare_digest(candidate, expected)


def _token_ok(record: WorkerRecord, token: str | None) -> bool:
    return token_matches(token, record.token_hash)


def heartbeat_reply(
    worker_id: str,
    coordinator_id: str,
    state: WorkerHealth,
    assigned: list[str],
    heartbeat_interval: float,
) -> bytes:
    """``WorkerHeartbeatResponse`` as JSON, written directly (the hottest control-plane answer).

    Every string in it is pattern-checked (ids, service names) or a literal, so none needs
    escaping; a test holds it equal to the model's own serialisation.
    """
    services = ",".join(f'"{name}"' for name in assigned)
    return (
        f'{{"ok":true,"worker_id":"{worker_id}","coordinator_id":"{coordinator_id}",'
        f'"state":"{state}","assigned_services":[{services}],'
        f'"heartbeat_interval":{heartbeat_interval!r}}}'
    ).encode()


def _parts_response(status: int, payload: bytes, headers: dict[str, str]) -> web.Response:
    """The aiohttp response of an ``answer_*`` method's (status, JSON body, extra headers)."""
    return web.Response(
        status=status, body=payload, content_type="application/json", headers=headers or None
    )


def _json(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json")
