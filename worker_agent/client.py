"""Control-plane calls to a coordinator or the router, typed by what the caller should do.

- :class:`Unreachable`: network failure, timeout, 5xx, 429 or a reply that is not the contract:
  retry later (with backoff), or fail over after ``FAILOVER_AFTER`` in a row.
- :class:`Rejected`: a 4xx with the wire ``{"error": code}``: 404/401 on a heartbeat mean
  "register again". Bearer tokens are never logged, and redirects are never followed (a token must
  not travel to another host).
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from coordinator.protocol import (
    EdgeHeartbeatRequest,
    EdgeRegisterRequest,
    EdgeRegisterResponse,
    HealthResponse,
    ServicesResponse,
    WorkerHeartbeatRequest,
    WorkerHeartbeatResponse,
    WorkerRegisterRequest,
    WorkerRegisterResponse,
    WorkersResponse,
)
from worker_agent.replies import read_capped

M = TypeVar("M", bound=BaseModel)
MAX_REPLY = 4 * 1024 * 1024


class ControlError(Exception):
    def __init__(
        self, message: str, *, status: int = 0, code: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        #: Seconds the other side asked us to wait (``Retry-After`` on a 503 or 429).
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in delta-seconds (the HTTP-date form is ignored), capped at one hour."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), 3600.0)


class Unreachable(ControlError):
    """Try again later."""


class Rejected(ControlError):
    """The other side refused the request (4xx)."""


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _text_detail(body: bytes) -> str:
    """A one-line excerpt of a reply that is not JSON: an HTML page's ``<title>`` (a Cloudflare
    or captive-portal error page), else its first bytes, whitespace collapsed."""
    match = _TITLE.search(body[:65536])
    text = (match.group(1) if match else body[:200]).decode("utf-8", "replace")
    return " ".join(text.split())[:200]


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body)
    except ValueError:
        return "", _text_detail(body)
    if not isinstance(data, dict):
        return "", ""
    detail = data.get("detail")
    return str(data.get("error", ""))[:100], str(detail)[:300] if detail is not None else ""


class ControlClient:
    """JSON over HTTP with one session; every call has ``HTTP_TIMEOUT``."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(
        self,
        method: str,
        url: str,
        reply: type[M] | None,
        *,
        body: BaseModel | None = None,
        token: str | None = None,
        limit_s: float | None = None,
    ) -> M | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body.model_dump_json(exclude_none=True).encode() if body is not None else None
        where = url.split("?", 1)[0]
        try:
            async with self.session.request(
                method,
                url,
                data=data,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=limit_s) if limit_s else self.timeout,
            ) as resp:
                raw = await read_capped(resp, MAX_REPLY)
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"{method} {where}: {type(exc).__name__}: {exc}") from None
        if status >= 500 or status == 429 or 300 <= status < 400:
            code, detail = _error_of(raw)
            raise Unreachable(
                f"{method} {where}: HTTP {status} {code} {detail}".rstrip(),
                status=status,
                code=code,
                retry_after=retry_after if status in (429, 503) else None,
            )
        if status >= 400:
            code, detail = _error_of(raw)
            raise Rejected(
                f"{method} {where}: HTTP {status} {code}: {detail}", status=status, code=code
            )
        if reply is None:
            return None
        try:
            return reply.model_validate_json(raw)
        except ValidationError as exc:
            raise Unreachable(
                f"{method} {where}: the reply is not a {reply.__name__} "
                f"({exc.error_count()} errors)",
                status=status,
                code="bad_reply",
            ) from None

    # ------------------------------------------------------------------ workers

    async def register(
        self, base: str, req: WorkerRegisterRequest, join_token: str | None
    ) -> WorkerRegisterResponse:
        out = await self._call(
            "POST",
            f"{base}/api/worker/register",
            WorkerRegisterResponse,
            body=req,
            token=join_token,
        )
        assert out is not None
        return out

    async def heartbeat(
        self, base: str, beat: WorkerHeartbeatRequest, token: str, limit_s: float | None = None
    ) -> WorkerHeartbeatResponse:
        out = await self._call(
            "POST",
            f"{base}/api/worker/heartbeat",
            WorkerHeartbeatResponse,
            body=beat,
            token=token,
            limit_s=limit_s,
        )
        assert out is not None
        return out

    async def unregister(self, base: str, worker_id: str, token: str) -> None:
        await self._call("DELETE", f"{base}/api/worker/{worker_id}", None, token=token)

    # ------------------------------------------------------------------ views

    async def health(self, base: str) -> HealthResponse:
        out = await self._call("GET", f"{base}/health", HealthResponse)
        assert out is not None
        return out

    async def services(self, base: str) -> ServicesResponse:
        out = await self._call("GET", f"{base}/api/services", ServicesResponse)
        assert out is not None
        return out

    async def workers(self, base: str, admin_token: str) -> WorkersResponse:
        out = await self._call("GET", f"{base}/api/workers", WorkersResponse, token=admin_token)
        assert out is not None
        return out

    # ------------------------------------------------------------------ edge coordinators

    async def edge_register(
        self, router: str, req: EdgeRegisterRequest, join_token: str | None
    ) -> EdgeRegisterResponse:
        out = await self._call(
            "POST", f"{router}/api/edge/register", EdgeRegisterResponse, body=req, token=join_token
        )
        assert out is not None
        return out

    async def edge_heartbeat(self, router: str, beat: EdgeHeartbeatRequest, secret: str) -> None:
        await self._call("POST", f"{router}/api/edge/heartbeat", None, body=beat, token=secret)

    async def edge_unregister(self, router: str, coordinator_id: str, secret: str) -> None:
        await self._call("DELETE", f"{router}/api/edge/{coordinator_id}", None, token=secret)
