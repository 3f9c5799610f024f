"""Peer servers the coordinator is compared against (run as ``python -m bench.peers KIND``).

- ``bare``: the least an aiohttp heartbeat endpoint can do, a POST handler that parses the JSON
  body and answers a small JSON object; and ``GET /service/echo/...`` answering ``{"ok":true}``
  with no upstream at all, the most any proxy served by aiohttp can reach.
- ``backend``: a worker stand-in for the proxy figures. ``/service/echo/sse`` answers
  ``text/event-stream`` (chunked, no length), the first event at once and the others
  ``gap_ms`` apart; any other path answers ``{"ok":true}``. The gateway key header is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

OK_BODY = b'{"ok":true}'


async def _bare_heartbeat(request: web.Request) -> web.Response:
    data = json.loads(await request.read())
    body = json.dumps({"ok": True, "worker_id": data.get("worker_id")}).encode()
    return web.Response(body=body, content_type="application/json")


async def _bare_ok(request: web.Request) -> web.Response:
    return web.Response(body=OK_BODY, content_type="application/json")


def bare_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/worker/heartbeat", _bare_heartbeat)
    app.router.add_get("/service/echo/{tail:.*}", _bare_ok)
    return app


async def _ok(request: web.Request) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=OK_BODY, content_type="application/json")


async def _sse(request: web.Request) -> web.StreamResponse:
    chunks = int(request.query.get("chunks", "3"))
    gap = float(request.query.get("gap_ms", "2")) / 1000.0
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(chunks):
        if i:
            await asyncio.sleep(gap)
        await resp.write(f"data: {i}\n\n".encode())
    await resp.write_eof()
    return resp


def backend_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/service/echo/sse", _sse)
    app.router.add_route("*", "/{tail:.*}", _ok)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("kind", choices=["bare", "backend"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = bare_app() if args.kind == "bare" else backend_app()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
