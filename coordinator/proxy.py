"""``ANY /service/{name}/{path}``: stream a public request to the least-loaded ready worker.

Bodies stream both ways without buffering (JSON bodies up to ``MAX_MODEL_SNIFF_BODY`` are read
once to route by their ``model``). Method, path and raw query string are kept, hop-by-hop
headers dropped, ``X-Forwarded-*`` and ``X-Request-Id`` set (``CF-Connecting-IP`` and ``CF-Ray``
count only from a peer in ``TRUSTED_PROXIES``: :mod:`coordinator.forwarding`), and the worker's
gateway key added (any client copy of an ``X-RMA-*`` header is stripped). A connection failure
before any byte went out is retried on another worker and counts a strike against the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING
from urllib.parse import unquote

import structlog
from aiohttp import web

from coordinator.errors import json_error
from coordinator.forwarding import CLOUDFLARE_HEADERS, TrustedProxies
from coordinator.headers import REQUEST_ID_RE, drop_set, relayed_response_headers
from coordinator.protocol import GATEWAY_KEY_HEADER, INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER
from coordinator.upstream import (
    ConnectFailed,
    Disconnected,
    ResponseTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

if TYPE_CHECKING:
    from coordinator.metrics import Metrics
    from coordinator.registry import Registry, WorkerRecord
    from coordinator.scheduler import Slot
    from coordinator.settings import CoordinatorSettings

log = structlog.get_logger("coordinator.proxy")

#: Request headers the proxy sets itself; clients' copies are dropped.
_REPLACED_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
)
#: Response headers the proxy sets itself.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Responses with a known length up to this size are sent in one piece.
_SMALL_BODY = 64 * 1024


def request_id_of(request: web.Request) -> str:
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is not None and REQUEST_ID_RE.match(value):
        return value
    return os.urandom(16).hex()


def sniff_model(body: bytes) -> str | None:
    """The ``model`` field of a JSON object body, if it is a string."""
    if b'"model"' not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= 256 else None


class _ConnectFailed(Exception):
    """The worker could not be reached before any request byte was sent."""


class Proxy:
    def __init__(self, registry: Registry, settings: CoordinatorSettings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        self._pool: UpstreamPool | None = None

    async def start(self) -> None:
        self._pool = UpstreamPool(
            connect_timeout=self.settings.proxy_connect_timeout,
            read_timeout=self.settings.proxy_ttfb_timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------ entry point

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        service = self.registry.resolve(name)
        if not self.registry.known_service(service):
            return json_error(
                404,
                "unknown_service",
                f"no service named {name!r}",
                available=self.registry.service_names(),
            )
        raw_path, _, query = request.raw_path.partition("?")
        tail = raw_path[len("/service/") + len(name) :]
        if tail and not tail.startswith("/"):
            return json_error(404, "unknown_service", f"no service named {name!r}")
        if ("." in tail or "%" in tail) and any(
            seg in (".", "..") for seg in unquote(tail).split("/")
        ):
            return json_error(400, "invalid_path", "dot segments are not allowed")
        if self.in_flight >= self.settings.max_inflight:
            return self._unavailable("overloaded", "the coordinator is at its concurrency limit")

        body: bytes | None = None
        model: str | None = None
        method = request.method
        length = request.content_length
        if (
            method in _BODY_METHODS
            and length is not None
            and 0 < length <= self.settings.max_model_sniff_body
            and request.content_type == "application/json"
        ):
            body = await request.read()
            model = sniff_model(body)

        pool = self.registry.pool(service, model)
        if pool is None and model is not None and self.registry.models(service):
            return json_error(
                404,
                "model_not_available",
                f"no worker of {service!r} serves model {model!r}",
                available=self.registry.models(service),
            )
        if pool is None or pool.size == 0:
            return self._unavailable("no_ready_workers", f"no worker is ready for {service!r}")

        request_id = request_id_of(request)
        target = f"/service/{service}{tail or '/'}" + (f"?{query}" if query else "")
        headers = self._request_headers(request, request_id)
        exclude: frozenset[str] = frozenset()
        last_failed: WorkerRecord | None = None
        for attempt in range(1 + self.settings.proxy_retries):
            slot = pool.pick(self.registry.rng, exclude)
            if slot is None:
                break
            worker = slot.worker
            try:
                return await self._forward(
                    request, slot, service, target, headers, body, request_id
                )
            except _ConnectFailed as exc:
                self.registry.strike(worker)
                log.warning(
                    "worker_unreachable",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    attempt=attempt + 1,
                    reason=str(exc),
                )
                last_failed = worker
                if body is None and request.body_exists and request.content.total_bytes:
                    break  # part of a streamed body is gone: it cannot be sent again
                exclude = exclude | {worker.worker_id}
        if last_failed is not None:
            return self._worker_unreachable(last_failed, request_id)
        return self._unavailable("all_workers_busy", f"every {service!r} worker is busy")

    # ------------------------------------------------------------------ helpers

    def _unavailable(self, code: str, detail: str) -> web.Response:
        self.metrics.proxy_rejected(code)
        return json_error(
            503, code, detail, headers={"Retry-After": str(self.settings.retry_after)}
        )

    def _worker_unreachable(
        self,
        worker: WorkerRecord,
        request_id: str,
        status: int = 502,
        code: str = "worker_unreachable",
        detail: str = "the worker could not be reached",
    ) -> web.Response:
        return json_error(status, code, detail, worker_id=worker.worker_id, request_id=request_id)

    def _request_headers(self, request: web.Request, request_id: str) -> list[tuple[str, str]]:
        remote = request.remote or ""
        # As the front door does per connection (FrontProtocol.connection_made).
        trusted = self.trusted_proxies.trusts(remote)
        drop = drop_set(request.headers)
        if not trusted:
            drop |= CLOUDFLARE_HEADERS  # forged: neither believed nor passed on
        out = [
            (key, value)
            for key, value in request.headers.items()
            if (lower := key.lower()) not in drop
            and lower not in _REPLACED_REQUEST
            and not lower.startswith(INTERNAL_HEADER_PREFIX)
        ]
        if trusted:
            client = request.headers.get("CF-Connecting-IP") or remote
            proto = "https" if "CF-Ray" in request.headers else request.scheme
        else:
            client, proto = remote, request.scheme
        out.append(("X-Forwarded-For", client))
        out.append(("X-Forwarded-Proto", proto))
        out.append(("X-Forwarded-Host", request.host))
        out.append((REQUEST_ID_HEADER, request_id))
        return out

    async def _send(
        self,
        request: web.Request,
        worker: WorkerRecord,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
    ) -> UpstreamResponse:
        assert self._pool is not None, "Proxy.start() was not awaited"
        if worker.gateway_key:
            headers = [*headers, (GATEWAY_KEY_HEADER, worker.gateway_key)]
        replayable = body is not None or not request.body_exists
        for fresh in (False, True):
            data: bytes | AsyncIterable[bytes] | None = body
            if body is None and request.body_exists:
                data = request.content.iter_any()
            try:
                return await self._pool.request(
                    request.method,
                    worker.origin,
                    target,
                    headers,
                    data,
                    body_length=request.content_length,
                    fresh=fresh,
                )
            except ConnectFailed as exc:
                raise _ConnectFailed(str(exc)) from exc
            except Disconnected as exc:
                # A pooled connection that the worker had closed: try once on a new one.
                if exc.reused and replayable and not fresh:
                    continue
                if replayable:
                    raise _ConnectFailed(str(exc)) from exc
                raise
        raise AssertionError("unreachable")

    async def _forward(
        self,
        request: web.Request,
        slot: Slot,
        service: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        request_id: str,
    ) -> web.StreamResponse:
        worker = slot.worker
        self.registry.acquire(slot)
        self.in_flight += 1
        started = time.perf_counter()
        status = 0
        try:
            try:
                upstream = await self._send(request, worker, target, headers, body)
            except Disconnected:
                status = 502
                return self._worker_unreachable(worker, request_id)
            except ResponseTimeout:
                status = 504
                return self._worker_unreachable(
                    worker,
                    request_id,
                    504,
                    "worker_timeout",
                    f"no response within {self.settings.proxy_ttfb_timeout:g} s",
                )
            except UpstreamError as exc:
                status = 502
                log.warning(
                    "worker_bad_response",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=str(exc),
                )
                return self._worker_unreachable(
                    worker,
                    request_id,
                    502,
                    "worker_bad_response",
                    "the worker's answer was not valid HTTP",
                )
            status = upstream.status
            self.metrics.observe_response(service, time.perf_counter() - started)
            return await self._relay(request, upstream, worker, request_id)
        finally:
            self.in_flight -= 1
            self.registry.release(slot)
            if status:
                self.metrics.proxied(service, status)

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        worker: WorkerRecord,
        request_id: str,
    ) -> web.StreamResponse:
        headers = relayed_response_headers(upstream.raw_headers, request_id)
        length = upstream.content_length
        is_stream = upstream.content_type == "text/event-stream"
        try:
            if request.method == "HEAD":
                head = web.Response(status=upstream.status, headers=headers)
                if length is not None:
                    head.headers["Content-Length"] = str(length)
                return head
            if length is not None and length <= _SMALL_BODY and not is_stream:
                payload = await upstream.read()
                return web.Response(status=upstream.status, headers=headers, body=payload)
            resp = web.StreamResponse(status=upstream.status, headers=headers)
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            try:
                async for chunk in upstream.iter_chunks():
                    await resp.write(chunk)
            except UpstreamError as exc:
                log.warning(
                    "stream_broken",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=str(exc),
                )
                if is_stream:
                    await _send_sse_error(resp, worker, request_id)
                # Leave the message incomplete so the client sees the failure.
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
            return resp
        except UpstreamError:
            upstream.close()
            return self._worker_unreachable(
                worker, request_id, 502, "worker_stream_broken", "the worker's answer broke off"
            )
        except BaseException:
            upstream.close()
            raise
        finally:
            upstream.release()


async def _send_sse_error(resp: web.StreamResponse, worker: WorkerRecord, request_id: str) -> None:
    event = json.dumps(
        {
            "error": "worker_stream_broken",
            "hop": "coordinator",
            "worker_id": worker.worker_id,
            "request_id": request_id,
        }
    )
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await resp.write(f"event: error\ndata: {event}\n\n".encode())
