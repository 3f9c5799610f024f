"""Slowloris (headers and bodies trickled in) and client-supplied internal headers.

Both servers run with a 1 s ``CLIENT_READ_TIMEOUT`` / ``GATEWAY_READ_TIMEOUT``: a client that
trickles its headers one line every 0.3 s is cut off within the bound, not served forever.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from coordinator.protocol import GATEWAY_KEY_HEADER
from tests.security.conftest import GATEWAY_KEY, Federation, register_body
from tests.worker_agent.conftest import start_site

BOUND = 1.0  # the read timeout the fixtures configure


async def _trickle_headers(port: int) -> tuple[float, bytes]:
    """Send a request line, then one header every 0.3 s; seconds until the server hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    got = b""
    try:
        for i in range(40):  # 12 s if never cut off
            await asyncio.sleep(0.3)
            if reader.at_eof():
                break
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await writer.drain()
        got = await asyncio.wait_for(reader.read(), 1)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return time.monotonic() - started, got


async def test_slowloris_headers_are_cut_off(fed: Federation) -> None:
    coord_port = int(fed.url.rsplit(":", 1)[1])
    (coord_s, coord_got), (gw_s, gw_got) = await asyncio.gather(
        _trickle_headers(coord_port), _trickle_headers(fed.gateway.port)
    )
    for took, got in ((coord_s, coord_got), (gw_s, gw_got)):
        assert took < BOUND + 1.5, f"connection held for {took:.1f} s"
        assert b"200 OK" not in got  # never served


async def test_slow_control_body_is_408(fed: Federation, http: aiohttp.ClientSession) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(fed.url.rsplit(":", 1)[1]))
    writer.write(
        b"POST /api/worker/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n{"
    )
    await writer.drain()
    started = time.monotonic()
    for _ in range(3):  # a few bytes, slowly, then nothing more: the body never completes
        await asyncio.sleep(0.2)
        writer.write(b" ")
        await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 4)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert b'"request_timeout"' in head
    assert time.monotonic() - started < BOUND + 1.5
    assert set(await fed.snapshot(http)) == {"w-legit"}


async def test_keep_alive_still_works_within_the_bound(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with http.get(f"{fed.url}/health") as resp:
            assert resp.status == 200
        await asyncio.sleep(0.3)


async def test_client_internal_headers_are_replaced_at_the_coordinator(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    """Forged gateway keys, ``X-RMA-*`` and ``X-Forwarded-*`` never reach the worker as sent."""
    seen: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.copy())
        return web.json_response(
            {"ok": True}, headers={"X-RMA-Gateway-Key": "leak", "X-RMA-X": "1"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    site = await start_site(app)
    try:
        async with http.post(
            f"{fed.url}/api/worker/register", json=register_body(site.url, worker_id="w-rec")
        ) as resp:
            assert resp.status == 200
        fed.coordinator.registry.remove("w-legit", "test")  # only the recorder serves echo
        forged = {
            GATEWAY_KEY_HEADER: "forged-key-forged-key-forged-key",
            "X-RMA-Worker-Id": "w-legit",
            "x-rma-anything": "1",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "gopher",
        }
        async with http.get(f"{fed.url}/service/echo/x", headers=forged) as resp:
            assert resp.status == 200
            # Internal headers a worker sends back are stripped on the way out as well.
            assert not any(k.lower().startswith("x-rma-") for k in resp.headers)
        got = seen[-1]
        assert got.getall(GATEWAY_KEY_HEADER) == [GATEWAY_KEY]
        assert "X-RMA-Worker-Id" not in got
        assert "x-rma-anything" not in got
        assert got.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert got.getall("X-Forwarded-Host") != ["evil.example"]
        assert got.getall("X-Forwarded-Proto") == ["http"]
    finally:
        await site.runner.cleanup()


async def test_gateway_rejects_callers_without_the_key(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    """Straight at the gateway: no key, a wrong key, a non-ASCII key, or forged headers."""
    url = f"{fed.gateway_url}/service/echo/x"
    for headers in (
        {},
        {GATEWAY_KEY_HEADER: ""},
        {GATEWAY_KEY_HEADER: GATEWAY_KEY[:-1]},
        {GATEWAY_KEY_HEADER: GATEWAY_KEY.upper()},
        {"X-Forwarded-For": "127.0.0.1", "X-RMA-Worker-Id": "w-legit"},
        {"Authorization": f"Bearer {GATEWAY_KEY}"},
    ):
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 401, headers
            assert (await resp.json())["error"] == "unauthorized"
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.gateway.port)
    writer.write(b"GET /service/echo/x HTTP/1.1\r\nHost: x\r\nX-RMA-Gateway-Key: \xff\xfe\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    # With the key, the echo never reflects internal headers back.
    async with http.get(url, headers={GATEWAY_KEY_HEADER: GATEWAY_KEY, "X-RMA-Other": "1"}) as resp:
        assert resp.status == 200
        echoed = (await resp.json())["headers"]
        assert not any(k.lower().startswith("x-rma-") for k in echoed)
