"""The local service gateway: what the tunnel points at (default ``127.0.0.1:8000``).

``ANY /service/{name}/{path}`` goes to the backend of ``name`` with the path and raw query string,
streaming both ways (SSE token by token), hop-by-hop headers dropped, ``X-Request-Id`` kept. Only
the coordinator may call it: every request must carry the gateway key the agent sent at
registration (``X-RMA-Gateway-Key``, compared in constant time). ``GET /health`` is open. Only
the services the coordinator assigned are served; every failure answers JSON naming the hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from coordinator.headers import REQUEST_ID_RE, drop_set
from coordinator.protocol import GATEWAY_KEY_HEADER, INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER
from worker_agent.backends import ECHO, Backend, Backends
from worker_agent.settings import WorkerSettings

log = structlog.get_logger("worker_agent.gateway")

HOP = "worker"
_NOT_FORWARDED = frozenset({"host", "content-length"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, error: str, detail: Any = None, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": error, "detail": detail, "hop": HOP}
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":"), default=str).encode(),
        content_type="application/json",
        headers=headers,
    )


class Gateway:
    """The gateway's state and handlers. ``assigned`` is updated from registration replies."""

    def __init__(
        self,
        settings: WorkerSettings,
        backends: Backends,
        gateway_key: str,
        worker_id: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.backends = backends
        self._key = gateway_key.encode("utf-8")
        self._worker_id = worker_id
        self.assigned: frozenset[str] = frozenset()
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        # keepalive_timeout also bounds the time to send request headers (slowloris).
        handler_args = {
            "max_field_size": 16_384,
            "keepalive_timeout": self.settings.gateway_read_timeout,
        }
        app = web.Application(middlewares=[self._errors], handler_args=handler_args)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/service/{name}", self.service)
        app.router.add_route("*", "/service/{name}/{tail:.*}", self.service)
        return app

    async def start(self, host: str, port: int, *, fallback_to_free_port: bool = True) -> int:
        """Listen on ``host:port`` (a free port when it is taken and fallback is allowed)."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.backend_connect_timeout,
                sock_read=self.settings.backend_read_timeout,
            ),
        )
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, host, port)
            await site.start()
        except OSError as exc:
            if not fallback_to_free_port or port == 0:
                await self.close()
                raise
            log.warning("gateway_port_busy", port=port, error=str(exc), using="a free port")
            site = web.TCPSite(self._runner, host, 0)
            await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("gateway_started", host=host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no request is in flight; ``False`` if ``limit_s`` passed first."""
        try:
            async with asyncio.timeout(limit_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def abandon_drain(self) -> None:
        """Stop waiting for in-flight requests (a second SIGTERM)."""
        self._idle.set()

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            return json_error(exc.status, code, f"{request.method} {request.path}")
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("gateway_internal_error", path=request.path)
            return json_error(500, "internal_error", "the worker gateway failed; this is a bug")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "worker_id": self._worker_id(),
                "state": "draining" if self.draining else "active",
            }
        )

    def _authorised(self, request: web.Request) -> bool:
        presented = request.headers.get(GATEWAY_KEY_HEADER, "").encode("utf-8", "replace")
        return hmac.compare_digest(presented, self._key)

    async def service(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return json_error(
                401, "unauthorized", "only the coordinator may call this gateway (gateway key)"
            )
        name = request.match_info["name"]
        backend = self.backends.get(name)
        if backend is None or name not in self.assigned:
            return json_error(
                404,
                "service_not_assigned",
                f"this worker does not serve {name!r}",
            )
        raw_path, _, query = request.raw_path.partition("?")
        tail = raw_path[len("/service/") + len(name) :]
        if tail and not tail.startswith("/"):
            return json_error(404, "service_not_assigned", f"this worker does not serve {name!r}")
        if ("." in tail or "%" in tail) and any(
            seg in (".", "..") for seg in unquote(tail).split("/")
        ):
            return json_error(400, "invalid_path", "dot segments are not allowed")
        if self.draining:
            return json_error(
                503, "draining", "this worker is shutting down", headers={"Retry-After": "1"}
            )
        if self.in_flight >= self.settings.gateway_max_inflight:
            return json_error(
                503, "overloaded", "the worker is at its limit", headers={"Retry-After": "1"}
            )
        if backend.in_flight >= backend.max_concurrency:
            return json_error(
                503, "busy", f"{name!r} is at its concurrency limit", headers={"Retry-After": "1"}
            )
        value = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = value if REQUEST_ID_RE.match(value) else uuid.uuid4().hex
        self.in_flight += 1
        backend.in_flight += 1
        self._idle.clear()
        try:
            if backend.kind == "echo":
                return await self._echo(request, tail, query, request_id)
            return await self._forward(request, backend, tail, query, request_id)
        finally:
            backend.in_flight -= 1
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _echo(
        self, request: web.Request, tail: str, query: str, request_id: str
    ) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        headers = {
            k: v
            for k, v in request.headers.items()
            if not k.lower().startswith(INTERNAL_HEADER_PREFIX)
        }
        return web.json_response(
            {
                "service": ECHO,
                "method": request.method,
                "path": tail or "/",
                "query": query,
                "headers": headers,
                "body_bytes": size,
                "worker_id": self._worker_id(),
                "request_id": request_id,
            },
            headers={REQUEST_ID_HEADER: request_id},
        )

    def _backend_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        drop = drop_set(request.headers)
        out: CIMultiDict[str] = CIMultiDict()
        for key, value in request.headers.items():
            lower = key.lower()
            if (
                lower in drop
                or lower in _NOT_FORWARDED
                or lower == "x-request-id"
                or lower.startswith(INTERNAL_HEADER_PREFIX)
            ):
                continue
            out.add(key, value)
        out[REQUEST_ID_HEADER] = request_id
        if request.content_length is not None and request.body_exists:
            out["Content-Length"] = str(request.content_length)
        return out

    async def _forward(
        self,
        request: web.Request,
        backend: Backend,
        tail: str,
        query: str,
        request_id: str,
    ) -> web.StreamResponse:
        assert self._session is not None
        assert backend.url is not None
        target = URL(backend.url + (tail or "/") + (f"?{query}" if query else ""), encoded=True)
        headers = self._backend_headers(request, request_id)
        data: AsyncIterator[bytes] | None = None
        if request.body_exists:
            data = request.content.iter_any()
        try:
            upstream = await self._session.request(
                request.method,
                target,
                headers=headers,
                data=data,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except TimeoutError:
            return json_error(504, "backend_timeout", f"{backend.name!r} did not answer in time")
        except aiohttp.ClientError as exc:
            log.warning(
                "backend_unreachable",
                service=backend.name,
                request_id=request_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return json_error(502, "backend_unreachable", f"{backend.name!r} could not be reached")
        try:
            return await self._relay(request, upstream, backend, request_id)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        backend: Backend,
        request_id: str,
    ) -> web.StreamResponse:
        drop = drop_set(upstream.headers)
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in upstream.headers.items():
            lower = key.lower()
            if (
                lower in drop
                or lower in ("content-length", "x-request-id")
                or lower.startswith(INTERNAL_HEADER_PREFIX)
            ):
                continue
            headers.add(key, value)
        headers[REQUEST_ID_HEADER] = request_id
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        length = upstream.content_length
        if (
            length is not None
            and upstream.status >= 200
            and upstream.status not in (204, 304)
            and "chunked" not in upstream.headers.get("Transfer-Encoding", "")
        ):
            resp.content_length = length
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "backend_stream_broken",
                service=backend.name,
                request_id=request_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            # Leave the message incomplete so the caller sees the failure.
            if request.transport is not None:
                request.transport.close()
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
