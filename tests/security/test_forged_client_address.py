"""A client that reaches the coordinator's port directly cannot choose the address or scheme that
workers see: ``CF-Connecting-IP`` and ``CF-Ray`` count only from ``TRUSTED_PROXIES`` peers.

Both servers (aiohttp alone, and behind the front door); the client connects from 127.0.0.1,
which ``TRUSTED_PROXIES=10.9.9.9/32`` (or an empty value) does not trust.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.security.conftest import Federation, register_body
from tests.worker_agent.conftest import start_site

#: Spellings a forger might try; every one of them is Cloudflare's header to an HTTP parser.
FORGERIES = [
    {"CF-Connecting-IP": "203.0.113.7", "CF-Ray": "8f1e2d3c4b5a6978-LHR"},
    {"cf-connecting-ip": "203.0.113.7", "cf-ray": "x"},
    {"CF-CONNECTING-IP": " 203.0.113.7 ", "CF-RAY": "x"},
    {"CF-Connecting-IP": "203.0.113.7", "X-Forwarded-For": "203.0.113.8"},
    {"CF-Ray": "x", "X-Forwarded-Proto": "https"},
]


async def _recorder(fed: Federation, http: aiohttp.ClientSession) -> tuple[list[Any], Any]:
    """A worker that records the headers it is sent, the only one serving ``echo``."""
    seen: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.copy())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    site = await start_site(app)
    async with http.post(
        f"{fed.url}/api/worker/register", json=register_body(site.url, worker_id="w-rec")
    ) as resp:
        assert resp.status == 200, await resp.text()
    fed.coordinator.registry.remove("w-legit", "test")
    return seen, site


@pytest.mark.parametrize("trusted_proxies", ["10.9.9.9/32", ""])
async def test_forged_cloudflare_headers_from_an_untrusted_peer_are_ignored(
    fed_factory: Callable[..., Awaitable[Federation]],
    http: aiohttp.ClientSession,
    trusted_proxies: str,
) -> None:
    fed = await fed_factory(trusted_proxies=trusted_proxies)
    seen, site = await _recorder(fed, http)
    try:
        for forged in FORGERIES:
            async with http.get(f"{fed.url}/service/echo/x", headers=forged) as resp:
                assert resp.status == 200
            got = seen[-1]
            assert got.getall("X-Forwarded-For") == ["127.0.0.1"], forged
            assert got.getall("X-Forwarded-Proto") == ["http"], forged
    finally:
        await site.runner.cleanup()


async def test_the_same_headers_from_a_trusted_peer_are_believed(
    fed_factory: Callable[..., Awaitable[Federation]], http: aiohttp.ClientSession
) -> None:
    """The default trusts loopback (cloudflared on the same host): the control case."""
    fed = await fed_factory()
    seen, site = await _recorder(fed, http)
    try:
        async with http.get(f"{fed.url}/service/echo/x", headers=FORGERIES[0]) as resp:
            assert resp.status == 200
        assert seen[-1].getall("X-Forwarded-For") == ["203.0.113.7"]
        assert seen[-1].getall("X-Forwarded-Proto") == ["https"]
    finally:
        await site.runner.cleanup()
