"""The local service gateway: what the tunnel points at (default ``127.0.0.1:8000``).

``ANY /service/{name}/{path}`` goes to the backend of ``name`` with the path and raw query string,
streaming both ways (SSE token by token), hop-by-hop headers dropped, ``X-Request-Id`` kept. Only
the coordinator may call it: every request must carry the gateway key the agent sent at
registration (``X-RMA-Gateway-Key``, compared in constant time). ``GET /health`` is open. Only
the services the coordinator assigned are served; every failure answers JSON naming the hop.
Backends are called through the coordinator's pooled HTTP/1.1 client
(:class:`coordinator.upstream.UpstreamPool`), the same one the coordinator uses for its hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from aiohttp import web

from coordinator.headers import REQUEST_ID_RE, drop_set, relayed_response_headers
from coordinator.protocol import GATEWAY_KEY_HEADER, INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER
from coordinator.upstream import (
    ConnectTimedOut,
    Disconnected,
    ResponseTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from worker_agent.backends import ECHO, Backend, Backends
from worker_agent.settings import WorkerSettings

log = structlog.get_logger("worker_agent.gateway")

HOP = "worker"
#: Request headers never forwarded as sent: the pool writes Host, Content-Length and
#: Transfer-Encoding itself, X-Request-Id is replaced by the checked (or a fresh) id, and
#: Expect was answered by this gateway's server (the body is sent at once, so a backend's
#: ``100 Continue`` would only be mistaken for its answer).
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "transfer-encoding", "x-request-id", "expect"}
)
#: Response headers the gateway sets itself.
#: A request that may be sent again on a new connection when a pooled one turns out closed
#: (the methods aiohttp's client retried, which this gateway used before).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Request bodies of known length up to this size are read first and sent with the head in one
#: write (they are in the socket buffer already); larger or unknown-length bodies stream.
_SMALL_REQUEST = 64 * 1024
#: Responses of known length up to this size (not event streams) are read whole and answered in
#: one write; others stream chunk by chunk with back-pressure.
_SMALL_RESPONSE = 64 * 1024
#: Idle pooled backend connections older than this are not reused (aiohttp's default).
_KEEPALIVE_S = 15.0
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
        self._pool: UpstreamPool | None = None
        self._origins: dict[str, tuple[tuple[str, str, int], str]] = {}
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
        self._pool = UpstreamPool(
            connect_timeout=self.settings.backend_connect_timeout,
            read_timeout=self.settings.backend_read_timeout,
            keepalive_timeout=_KEEPALIVE_S,
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
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

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

    def _origin(self, url: str) -> tuple[tuple[str, str, int], str]:
        """``((scheme, host, port), path prefix)`` of a backend URL, parsed once per URL."""
        known = self._origins.get(url)
        if known is None:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
            known = ((scheme, parts.hostname or "", port), parts.path)
            if len(self._origins) > 1024:  # backends come and go; never grow without bound
                self._origins.clear()
            self._origins[url] = known
        return known

    def _backend_headers(self, request: web.Request, request_id: str) -> list[tuple[str, str]]:
        drop = drop_set(request.headers)
        out = [
            (key, value)
            for key, value in request.headers.items()
            if (lower := key.lower()) not in drop
            and lower not in _NOT_FORWARDED
            and not lower.startswith(INTERNAL_HEADER_PREFIX)
        ]
        out.append((REQUEST_ID_HEADER, request_id))
        return out

    async def _forward(
        self,
        request: web.Request,
        backend: Backend,
        tail: str,
        query: str,
        request_id: str,
    ) -> web.StreamResponse:
        assert self._pool is not None, "Gateway.start() was not awaited"
        assert backend.url is not None
        origin, prefix = self._origin(backend.url)
        target = prefix + (tail or "/") + (f"?{query}" if query else "")
        headers = self._backend_headers(request, request_id)
        method = request.method
        length = request.content_length
        body: bytes | None = None
        if request.body_exists and length is not None and length <= _SMALL_REQUEST:
            body = await request.read()
        replayable = method in _IDEMPOTENT and (body is not None or not request.body_exists)
        upstream: UpstreamResponse | None = None
        try:
            for fresh in (False, True):
                data: bytes | AsyncIterable[bytes] | None = body
                if body is None and request.body_exists:
                    data = request.content.iter_any()
                try:
                    upstream = await self._pool.request(
                        method, origin, target, headers, data, body_length=length, fresh=fresh
                    )
                    break
                except Disconnected as exc:
                    # A pooled connection the backend had closed: once more on a new one.
                    if exc.reused and replayable and not fresh:
                        continue
                    raise
        except (ResponseTimeout, ConnectTimedOut):
            return json_error(504, "backend_timeout", f"{backend.name!r} did not answer in time")
        except UpstreamError as exc:
            log.warning(
                "backend_unreachable",
                service=backend.name,
                request_id=request_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return json_error(502, "backend_unreachable", f"{backend.name!r} could not be reached")
        assert upstream is not None
        try:
            return await self._relay(request, upstream, backend, request_id)
        except BaseException:
            upstream.close()
            raise
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        backend: Backend,
        request_id: str,
    ) -> web.StreamResponse:
        headers = relayed_response_headers(upstream.raw_headers, request_id)
        chunked = any(
            k.lower() == b"transfer-encoding" and b"chunked" in v for k, v in upstream.raw_headers
        )
        status = upstream.status
        length = upstream.content_length
        if chunked or status < 200 or status in (204, 304):
            length = None
        if request.method == "HEAD":
            resp = web.StreamResponse(status=status, headers=headers)
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            return resp
        try:
            if (
                length is not None
                and length <= _SMALL_RESPONSE
                and upstream.content_type != "text/event-stream"
            ):
                return web.Response(status=status, headers=headers, body=await upstream.read())
        except UpstreamError as exc:
            # Nothing was sent yet: answer the failure instead of a truncated body.
            self._broken(backend, request_id, exc)
            if isinstance(exc, ResponseTimeout):
                return json_error(
                    504, "backend_timeout", f"{backend.name!r} did not finish its answer in time"
                )
            return json_error(502, "backend_unreachable", f"{backend.name!r} broke off its answer")
        resp = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            async for chunk in upstream.iter_chunks():
                await resp.write(chunk)
        except UpstreamError as exc:
            self._broken(backend, request_id, exc)
            # Leave the message incomplete so the caller sees the failure.
            if request.transport is not None:
                request.transport.close()
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    def _broken(self, backend: Backend, request_id: str, exc: UpstreamError) -> None:
        log.warning(
            "backend_stream_broken",
            service=backend.name,
            request_id=request_id,
            error=f"{type(exc).__name__}: {exc}",
        )
