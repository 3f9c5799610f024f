"""``ANY /service/{name}/{path}``: stream a public request to the least-loaded ready worker.

Bodies stream both ways without buffering (JSON bodies up to ``MAX_MODEL_SNIFF_BODY`` are read
once to route by their ``model``). Method, path and raw query string are kept, hop-by-hop
headers dropped, ``X-Forwarded-*`` and ``X-Request-Id`` set, and the worker's gateway key added
(any client copy of an ``X-RMA-*`` header is stripped). A connection failure before any byte
went out is retried on another worker and counts a strike against the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from coordinator.errors import json_error
from coordinator.protocol import GATEWAY_KEY_HEADER, INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER

if TYPE_CHECKING:
    from coordinator.metrics import Metrics
    from coordinator.registry import Registry, WorkerRecord
    from coordinator.scheduler import Slot
    from coordinator.settings import CoordinatorSettings

log = structlog.get_logger("coordinator.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers the proxy sets itself; clients' copies are dropped.
_REPLACED_REQUEST = frozenset(
    {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Responses with a known length up to this size are sent in one piece.
_SMALL_BODY = 64 * 1024


def request_id_of(request: web.Request) -> str:
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is not None and _REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


def _drop_set(headers: Any) -> set[str]:
    """Hop-by-hop headers plus those the ``Connection`` header names."""
    drop = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(","))
    return drop


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
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.proxy_connect_timeout,
                sock_read=self.settings.proxy_ttfb_timeout,
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        if any(seg in (".", "..") for seg in unquote(tail).split("/")):
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
        path = f"/service/{service}{tail or '/'}" + (f"?{query}" if query else "")
        headers = self._request_headers(request, request_id)
        streaming_body = body is None and request.body_exists
        exclude: frozenset[str] = frozenset()
        attempts = 1 + self.settings.proxy_retries
        last_failed: WorkerRecord | None = None
        for attempt in range(attempts):
            slot = pool.pick(self.registry.rng, exclude)
            if slot is None:
                if last_failed is not None:
                    return self._worker_unreachable(last_failed, request_id)
                return self._unavailable("all_workers_busy", f"every {service!r} worker is busy")
            worker = slot.worker
            try:
                return await self._forward(request, slot, service, path, headers, body, request_id)
            except _ConnectFailed as exc:
                self.registry.strike(worker)
                log.warning(
                    "worker_unreachable",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    attempt=attempt + 1,
                    reason=str(exc),
                )
                if streaming_body and request.content.total_bytes:
                    break  # part of the body is gone: it cannot be sent again
                last_failed = worker
                exclude = exclude | {worker.worker_id}
        assert last_failed is not None or attempts == 0
        return self._worker_unreachable(last_failed, request_id)

    # ------------------------------------------------------------------ helpers

    def _unavailable(self, code: str, detail: str) -> web.Response:
        self.metrics.proxy_rejected(code)
        return json_error(
            503, code, detail, headers={"Retry-After": str(self.settings.retry_after)}
        )

    def _worker_unreachable(self, worker: WorkerRecord | None, request_id: str) -> web.Response:
        return json_error(
            502,
            "worker_unreachable",
            "the worker could not be reached",
            worker_id=worker.worker_id if worker else None,
            request_id=request_id,
        )

    def _request_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        drop = _drop_set(request.headers)
        out: CIMultiDict[str] = CIMultiDict()
        for key, value in request.headers.items():
            lower = key.lower()
            if (
                lower in drop
                or lower in _REPLACED_REQUEST
                or lower.startswith(INTERNAL_HEADER_PREFIX)
            ):
                continue
            out.add(key, value)
        client = request.headers.get("CF-Connecting-IP") or request.remote or ""
        out["X-Forwarded-For"] = client
        out["X-Forwarded-Proto"] = "https" if "CF-Ray" in request.headers else request.scheme
        out["X-Forwarded-Host"] = request.host
        out[REQUEST_ID_HEADER] = request_id
        return out

    async def _forward(
        self,
        request: web.Request,
        slot: Slot,
        service: str,
        path: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        request_id: str,
    ) -> web.StreamResponse:
        assert self._session is not None, "Proxy.start() was not awaited"
        worker = slot.worker
        out_headers = headers
        if worker.gateway_key:
            out_headers = headers.copy()
            out_headers[GATEWAY_KEY_HEADER] = worker.gateway_key
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        url = URL(worker.tunnel_url + path, encoded=True)
        self.registry.acquire(slot)
        self.in_flight += 1
        started = time.perf_counter()
        status = 0
        try:
            try:
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=out_headers,
                    data=data,
                    allow_redirects=False,
                    compress=None,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise _ConnectFailed(type(exc).__name__) from exc
            except aiohttp.ServerDisconnectedError as exc:
                if data is None or body is not None:
                    raise _ConnectFailed("server disconnected") from exc
                status = 502
                return self._worker_unreachable(worker, request_id)
            except (TimeoutError, aiohttp.ServerTimeoutError):
                status = 504
                return json_error(
                    504,
                    "worker_timeout",
                    f"no response within {self.settings.proxy_ttfb_timeout:g} s",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                )
            except aiohttp.ClientError as exc:
                status = 502
                log.warning(
                    "worker_error",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=type(exc).__name__,
                )
                return self._worker_unreachable(worker, request_id)
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
        upstream: aiohttp.ClientResponse,
        worker: WorkerRecord,
        request_id: str,
    ) -> web.StreamResponse:
        drop = _drop_set(upstream.headers)
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in upstream.headers.items():
            lower = key.lower()
            if lower in drop or lower.startswith(INTERNAL_HEADER_PREFIX) or lower == "x-request-id":
                continue
            headers.add(key, value)
        headers[REQUEST_ID_HEADER] = request_id
        length = upstream.content_length
        is_stream = upstream.content_type == "text/event-stream"
        try:
            if request.method == "HEAD" or (
                length is not None and length <= _SMALL_BODY and not is_stream
            ):
                payload = await upstream.read() if request.method != "HEAD" else b""
                small = web.Response(status=upstream.status, headers=headers, body=payload)
                if request.method == "HEAD" and length is not None:
                    small.headers["Content-Length"] = str(length)
                return small
            headers.popall("Content-Length", None)
            resp = web.StreamResponse(status=upstream.status, headers=headers)
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    "stream_broken",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=type(exc).__name__,
                )
                if is_stream:
                    await _send_sse_error(resp, worker, request_id)
                # Leave the message incomplete so the client sees the failure.
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            upstream.close()
            raise
        except (aiohttp.ClientError, TimeoutError):
            upstream.close()
            return self._worker_unreachable(worker, request_id)
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
