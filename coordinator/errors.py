"""JSON error answers and bounded body reading, shared by every endpoint."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

HOP = "coordinator"
M = TypeVar("M", bound=BaseModel)


def json_error(
    status: int,
    error: str,
    detail: Any = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """``{"error": code, "detail": ..., "hop": "coordinator", ...}`` with the given status."""
    return web.Response(
        status=status,
        body=error_body(error, detail, **extra),
        content_type="application/json",
        headers=headers,
    )


def error_body(error: str, detail: Any = None, **extra: Any) -> bytes:
    """The JSON body of :func:`json_error` (the front door writes the same bytes)."""
    body: dict[str, Any] = {"error": error, "detail": detail, "hop": HOP}
    body.update(extra)
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def response_parts(response: web.Response) -> tuple[int, bytes, dict[str, str]]:
    """A ready :func:`json_error` answer as (status, body, headers other than Content-Type)."""
    body = response.body if isinstance(response.body, bytes) else b""
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
    return response.status, body, headers


class BadRequest(Exception):
    """Raised while reading input; carries the ready JSON answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def read_capped(request: web.Request, limit: int, limit_s: float | None = None) -> bytes:
    """The request body, or :class:`BadRequest`: 413 over ``limit`` bytes, 408 after ``limit_s``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BadRequest(json_error(413, "body_too_large", f"at most {limit} bytes"))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limit_s):  # a slow body (slowloris) is cut off: 408
            if declared is not None:
                return await request.read()  # framed by Content-Length: it cannot exceed it
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BadRequest(json_error(413, "body_too_large", f"at most {limit} bytes"))
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(
            json_error(408, "request_timeout", f"the body took longer than {limit_s} s"),
        ) from None
    return b"".join(chunks)


def parse_model(model: type[M], body: bytes) -> M:
    """Validate JSON ``body`` as ``model``: 400 for broken JSON, 422 for schema errors."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadRequest(json_error(400, "invalid_json", errors[0]["msg"])) from None
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        raise BadRequest(json_error(422, "invalid_request", detail[:20])) from None


def bearer(request: web.Request) -> str | None:
    return bearer_token(request.headers.get("Authorization"))


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header value, or None."""
    scheme, _, token = (value or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:  # raw non-UTF-8 bytes in the header: no token of ours
        return None
    return token.strip()
