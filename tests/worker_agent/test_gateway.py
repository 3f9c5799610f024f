"""The local service gateway over real HTTP: key check, routing, streaming, errors, draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from coordinator.protocol import GATEWAY_KEY_HEADER
from tests.worker_agent.conftest import Site, agent_settings, free_port
from worker_agent.backends import Backends
from worker_agent.gateway import Gateway

KEY = "gateway-key-0123456789-abcdefghij"
SiteFactory = Callable[..., Awaitable[Site]]


class Gw:
    def __init__(self, gateway: Gateway, http: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.http = http
        self.url = f"http://127.0.0.1:{gateway.port}"

    def request(self, method: str, path: str, key: str | None = KEY, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers[GATEWAY_KEY_HEADER] = key
        return self.http.request(method, self.url + path, headers=headers, **kw)


@pytest.fixture
async def gw_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Gw]]]:
    made: list[tuple[Gateway, aiohttp.ClientSession]] = []

    async def factory(services: str = "", **overrides: Any) -> Gw:
        settings = agent_settings(tmp_path, services=services, **overrides)
        backends = Backends(settings)
        gateway = Gateway(settings, backends, KEY, lambda: "w-test")
        gateway.assigned = frozenset(backends.by_name)
        await gateway.start("127.0.0.1", 0)
        http = aiohttp.ClientSession(auto_decompress=False)
        made.append((gateway, http))
        return Gw(gateway, http)

    yield factory
    for gateway, http in made:
        await http.close()
        await gateway.close()


async def test_health_is_open_and_services_need_the_key(gw_factory: Any) -> None:
    gw = await gw_factory()
    async with gw.request("GET", "/health", key=None) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "worker_id": "w-test", "state": "active"}
    for key in (None, "", "wrong", KEY[:-1], KEY + "x"):
        async with gw.request("GET", "/service/echo/x", key=key) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"] == "unauthorized"
            assert body["hop"] == "worker"


async def test_echo_answers_what_it_received_without_the_key(gw_factory: Any) -> None:
    gw = await gw_factory()
    async with gw.request(
        "PUT",
        "/service/echo/a/b%2Fc?q=1&q=2",
        data=b"z" * 1234,
        headers={"X-Request-Id": "rid-1", "X-Rma-Other": "internal", "X-Mine": "1"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "rid-1"
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/a/b%2Fc"
    assert echo["query"] == "q=1&q=2"
    assert echo["body_bytes"] == 1234
    assert echo["worker_id"] == "w-test"
    assert echo["headers"]["X-Mine"] == "1"
    assert not any(k.lower().startswith("x-rma-") for k in echo["headers"])
    assert KEY not in str(echo)


async def test_unassigned_unknown_and_bad_paths_are_json_4xx(
    gw_factory: Any, site_factory: SiteFactory
) -> None:
    backend = await site_factory()
    gw = await gw_factory(services=f"stream={backend.url}")
    gw.gateway.assigned = frozenset({"echo"})  # the coordinator did not assign "stream"
    for path in ("/service/stream/x", "/service/nope/x", "/service/echoes"):
        async with gw.request("GET", path) as resp:
            assert resp.status == 404, path
            assert (await resp.json())["error"] == "service_not_assigned"
    async with gw.http.get(
        URL(f"{gw.url}/service/echo/%2e%2e/secret", encoded=True),
        headers={GATEWAY_KEY_HEADER: KEY},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_path"
    async with gw.request("GET", "/elsewhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    async with gw.request("POST", "/health") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
    assert backend.seen == []


async def test_forwarding_keeps_method_path_query_and_drops_hop_headers(
    gw_factory: Any, site_factory: SiteFactory
) -> None:
    backend = await site_factory()
    gw = await gw_factory(services=f"stream={backend.url}")
    async with gw.request(
        "POST",
        "/service/stream/v1/chat/completions?stream=true&x=%20y",
        json={"model": "m", "messages": []},
        headers={
            "X-Request-Id": "rid-9",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "X-Kept": "yes",
        },
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Backend"] == "stream"
        assert "X-Hop" not in resp.headers  # named by the backend's Connection header
        assert resp.headers["X-Request-Id"] == "rid-9"
        body = await resp.json()
    assert body["path"] == "/v1/chat/completions"
    seen = backend.seen[-1]
    assert seen["raw_path"] == "/v1/chat/completions?stream=true&x=%20y"
    assert seen["headers"]["X-Kept"] == "yes"
    assert seen["headers"]["X-Request-Id"] == "rid-9"
    lowered = {k.lower() for k in seen["headers"]}
    assert "x-drop-me" not in lowered
    assert "keep-alive" not in lowered
    assert GATEWAY_KEY_HEADER.lower() not in lowered
    assert seen["body"].startswith(b'{"model"')

    async with gw.request("HEAD", "/service/stream/plain") as resp:
        assert resp.status == 200
        assert resp.headers["X-Backend"] == "stream"
        assert await resp.read() == b""

    # a request without an id gets one, carried to the backend and back
    async with gw.request("GET", "/service/stream/plain") as resp:
        rid = resp.headers["X-Request-Id"]
    assert backend.seen[-1]["headers"]["X-Request-Id"] == rid


async def test_sse_streams_token_by_token_and_bodies_stream_in(
    gw_factory: Any, site_factory: SiteFactory
) -> None:
    backend = await site_factory()
    gw = await gw_factory(services=f"stream={backend.url}")
    arrivals = []
    t0 = time.monotonic()
    async with gw.request("POST", "/service/stream/stream?n=3&gap=0.3", json={}) as resp:
        async for chunk in resp.content.iter_any():
            arrivals.append((time.monotonic() - t0, chunk))
    assert b"".join(c for _, c in arrivals).count(b"data: token-") == 3
    assert arrivals[0][0] < 0.25

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 10_000
            await asyncio.sleep(0.01)

    async with gw.request("POST", "/service/stream/upload", data=body()) as resp:
        assert (await resp.json())["body_bytes"] == 40_000

    # Expect: 100-continue is answered by the gateway itself, not passed on (the backend's
    # interim 100 would otherwise be taken for its answer)
    async with gw.request(
        "POST", "/service/stream/upload", data=b"x" * 5000, expect100=True
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_bytes"] == 5000
    assert "expect" not in {k.lower() for k in backend.seen[-1]["headers"]}

    # compressed bodies pass through untouched
    async with gw.request("GET", "/service/stream/gzip") as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == b"\x1f\x8b-not-really-gzip"


async def test_backend_down_is_502_json(gw_factory: Any) -> None:
    gw = await gw_factory(services=f"down=http://127.0.0.1:{free_port()}")
    async with gw.request("GET", "/service/down/x") as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body == {
            "error": "backend_unreachable",
            "detail": "'down' could not be reached",
            "hop": "worker",
        }


async def test_backend_timeout_is_504_json(gw_factory: Any, site_factory: SiteFactory) -> None:
    backend = await site_factory()
    gw = await gw_factory(services=f"stream={backend.url}", backend_read_timeout=0.2)
    async with gw.request("GET", "/service/stream/slow?s=1") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "backend_timeout"


async def test_concurrency_limit_and_draining(gw_factory: Any, site_factory: SiteFactory) -> None:
    backend = await site_factory()
    gw = await gw_factory(services=f"stream={backend.url}", service_max_concurrency=1)
    slow = asyncio.ensure_future(gw.request("GET", "/service/stream/slow?s=0.5").__aenter__())
    await asyncio.sleep(0.15)
    assert gw.gateway.in_flight == 1
    async with gw.request("GET", "/service/stream/x") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "busy"
        assert resp.headers["Retry-After"] == "1"
    # Draining: new requests are refused, the in-flight one completes, then idle.
    gw.gateway.draining = True
    async with gw.request("GET", "/service/echo/x") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "draining"
    assert await gw.gateway.wait_idle(2.0)
    first = await slow
    assert first.status == 200
    first.release()
    async with gw.request("GET", "/health", key=None) as resp:
        assert (await resp.json())["state"] == "draining"


async def test_gateway_falls_back_to_a_free_port_when_busy(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    first = Gateway(settings, Backends(settings), KEY, lambda: "a")
    port = await first.start("127.0.0.1", 0)
    second = Gateway(settings, Backends(settings), KEY, lambda: "b")
    try:
        other = await second.start("127.0.0.1", port)
        assert other not in (0, port)
        third = Gateway(settings, Backends(settings), KEY, lambda: "c")
        with pytest.raises(OSError, match="address already in use"):
            await third.start("127.0.0.1", port, fallback_to_free_port=False)
    finally:
        await first.close()
        await second.close()


class RawBackend:
    """A backend written byte by byte: ``answer(nth_request_on_connection)`` gives the bytes to
    send back, or ``None`` to close the connection without answering; ``close_after`` closes
    it after each answer."""

    def __init__(self, answer: Callable[[int], bytes | None], close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nth = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                nth += 1
                self.requests += 1
                data = self.answer(nth)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_pooled_connection_the_backend_closed_is_retried_for_idempotent_requests(
    gw_factory: Any,
) -> None:
    # The backend keeps each connection open after its first answer but drops it, unanswered,
    # on the next request: the gateway's pooled connection turns out dead.
    backend = RawBackend(lambda nth: OK if nth == 1 else None)
    url = await backend.start()
    try:
        gw = await gw_factory(services=f"raw={url}")
        async with gw.request("GET", "/service/raw/a") as resp:
            assert resp.status == 200
            assert await resp.read() == b"ok"
        async with gw.request("GET", "/service/raw/b") as resp:
            assert resp.status == 200  # sent again on a new connection
            assert await resp.read() == b"ok"
        async with gw.request("POST", "/service/raw/c", data=b"not replayed") as resp:
            assert resp.status == 502  # not idempotent: never sent twice
            assert (await resp.json())["error"] == "backend_unreachable"
        assert backend.requests == 4  # a, b (dropped), b again, c (dropped)
    finally:
        await backend.close()


async def test_an_answer_that_breaks_off_before_its_declared_length_is_502_json(
    gw_factory: Any,
) -> None:
    backend = RawBackend(
        lambda nth: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", close_after=True
    )
    url = await backend.start()
    try:
        gw = await gw_factory(services=f"raw={url}")
        async with gw.request("GET", "/service/raw/a") as resp:
            assert resp.status == 502
            body = await resp.json()
            assert body["error"] == "backend_unreachable"
            assert body["hop"] == "worker"
    finally:
        await backend.close()


async def test_a_backend_connect_timeout_is_504_json(
    gw_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gw_factory(services="hung=http://127.0.0.1:9", backend_connect_timeout=0.05)
    loop = asyncio.get_running_loop()
    real = loop.create_connection

    async def hang_on_port_9(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
        if port == 9:
            await asyncio.Event().wait()
        return await real(factory, host, port, **kw)

    monkeypatch.setattr(loop, "create_connection", hang_on_port_9)
    async with gw.request("GET", "/service/hung/x") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "backend_timeout"
