"""The front door: routing per connection, hand-off to aiohttp, and raw HTTP/1.1 edge cases."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator.frontdoor import FrontServer, front_server, route_of
from tests.conftest import BackendFactory, Fed


def _front(fed: Fed) -> FrontServer:
    server = front_server(fed.client.server.runner)  # type: ignore[attr-defined]
    assert server is not None
    return server


async def _open(fed: Fed) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", fed.client.server.port)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return status, headers, body


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: coord.test\r\n{extra}\r\n".encode()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /service/echo/x HTTP/1.1\r\n", True),
        (b"POST /service/", True),
        (b"\r\nGET /service/a HTTP/1.1\r\n", True),
        (b"GET /health HTTP/1.1\r\n", False),
        (b"GET /serv", None),
        (b"GET /servicex/a HTTP/1.1\r\n", False),
        (b"GET http://h/service/a HTTP/1.1\r\n", False),
        (b"GET", None),
        (b"NOT-HTTP\r\n", False),
    ],
)
def test_route_of(head: bytes, expected: bool | None) -> None:
    assert route_of(head) is expected


async def test_keep_alive_connection_mixes_proxy_and_control_plane(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    served = _front(fed).served
    reader, writer = await _open(fed)
    try:
        writer.write(_get("/service/echo/one", "X-Request-Id: rid-1\r\n"))
        status, headers, body = await _response(reader)
        assert status == 200
        assert headers["x-request-id"] == "rid-1"
        assert json.loads(body)["tail"] == "one"
        assert _front(fed).served == served + 1  # answered by the front door
        # A control-plane request on the same connection: aiohttp takes the connection over.
        writer.write(_get("/health"))
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["coordinator_id"] == "coord-test"
        # Proxied requests keep working on it (through aiohttp's path, same behaviour).
        writer.write(_get("/service/echo/two", "X-Request-Id: rid-2\r\nX-RMA-Evil: 1\r\n"))
        status, headers, body = await _response(reader)
        assert status == 200
        assert headers["x-request-id"] == "rid-2"
        assert json.loads(body)["tail"] == "two"
        assert "X-RMA-Evil" not in backend.seen[-1]["headers"]
        assert _front(fed).served == served + 1
    finally:
        writer.close()


async def test_pipelined_proxy_requests_answer_in_order(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    reader, writer = await _open(fed)
    try:
        writer.write(_get("/service/echo/slow?s=0.2") + _get("/service/echo/fast"))
        first = await _response(reader)
        second = await _response(reader)
        assert json.loads(first[2])["tail"] == "slow"
        assert json.loads(second[2])["tail"] == "fast"
        # A control-plane request sent while ours is in progress goes to aiohttp once the
        # answer is out.
        writer.write(_get("/service/echo/slow?s=0.2"))
        await asyncio.sleep(0.05)
        writer.write(_get("/health"))
        assert json.loads((await _response(reader))[2])["tail"] == "slow"
        assert json.loads((await _response(reader))[2])["status"] == "ok"
    finally:
        writer.close()


async def test_pipelined_foreign_request_in_one_packet_closes_after_ours(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    reader, writer = await _open(fed)
    try:
        # One write, so one packet on loopback: the second request cannot be handed over.
        writer.write(_get("/service/echo/a") + _get("/health"))
        status, _, body = await _response(reader)
        assert status == 200
        if body and json.loads(body).get("tail") == "a":
            rest = await asyncio.wait_for(reader.read(), 5)
            # Either aiohttp got it (it arrived in a later packet) or the connection closed.
            assert rest == b"" or b'"status":"ok"' in rest
    finally:
        writer.close()


async def test_malformed_and_oversized_requests_get_json_errors(fed: Fed) -> None:
    reader, writer = await _open(fed)
    try:
        writer.write(b"GET /service/echo/x HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n")
        status, headers, body = await _response(reader)
        assert status == 400
        assert json.loads(body)["error"] == "bad_request"
        assert headers["connection"] == "close"
    finally:
        writer.close()
    reader, writer = await _open(fed)
    try:
        writer.write(_get("/service/echo/x", "X-Big: " + "a" * 20_000 + "\r\n"))
        status, _, body = await _response(reader)
        assert status == 431
        assert json.loads(body)["error"] == "headers_too_large"
    finally:
        writer.close()


async def test_http10_and_expect_continue(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    reader, writer = await _open(fed)
    try:
        writer.write(b"GET /service/echo/old HTTP/1.0\r\n\r\n")
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["tail"] == "old"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the answer
    finally:
        writer.close()
    reader, writer = await _open(fed)
    try:
        payload = b'{"model": null, "x": 1}'
        writer.write(
            b"POST /service/echo/up HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(payload)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(payload)
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["body_bytes"] == len(payload)
        assert "Expect" not in backend.seen[-1]["headers"]
    finally:
        writer.close()


async def test_chunked_request_body_streams_through(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    reader, writer = await _open(fed)
    try:
        writer.write(
            b"POST /service/echo/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(3):
            writer.write(b"5\r\nhello\r\n")
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        status, _, body = await _response(reader)
        assert status == 200
        assert json.loads(body)["body_bytes"] == 15
        assert backend.seen[-1]["body"] == b"hello" * 3
    finally:
        writer.close()


async def test_metrics_count_front_door_requests(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    for _ in range(3):
        assert (await fed.client.get("/service/echo/m")).status == 200
    text = await (await fed.client.get("/metrics")).text()
    assert 'rma_proxy_requests_total{service="echo",status="200"} 3.0' in text
    assert 'rma_proxy_response_seconds_count{service="echo"} 3.0' in text


async def test_idle_keep_alive_connections_close(
    fed: Fed, backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("coordinator.frontdoor._KEEPALIVE", 0.2)
    backend = await backend_factory()
    await fed.register(backend.url)
    reader, writer = await _open(fed)
    try:
        # A request longer than the idle limit is not cut off: the connection is busy.
        writer.write(_get("/service/echo/slow?s=0.5"))
        status, _, _ = await _response(reader)
        assert status == 200
        writer.write(_get("/service/echo/again"))
        assert (await _response(reader))[0] == 200
        # Idle past the limit: the coordinator closes it.
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()
