"""The front door: routing per connection, hand-off to aiohttp, and raw HTTP/1.1 edge cases."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
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
        (b"POST /api/worker/heartbeat HTTP/1.1\r\n", True),
        (b"POST /api/worker/heartbeat?x=1 HTTP/1.1\r\n", True),
        (b"POST /api/worker/heart", None),
        (b"POST /api/worker/heartbeat", None),
        (b"POST /api/worker/heartbeatx HTTP/1.1\r\n", False),
        (b"POST /api/worker/heartbeat/ HTTP/1.1\r\n", False),
        (b"GET /api/worker/heartbeat HTTP/1.1\r\n", False),
        (b"POST /api/worker/register HTTP/1.1\r\n", False),
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
        # A control-plane request on the same connection (the client asks for keep-alive):
        # aiohttp answers it and closes the connection.
        writer.write(_get("/health", "Connection: keep-alive\r\n"))
        status, headers, body = await _response(reader)
        assert status == 200
        assert headers["connection"] == "close"
        assert json.loads(body)["coordinator_id"] == "coord-test"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    # The client's next request, on a new connection, starts at the front door again.
    reader, writer = await _open(fed)
    try:
        writer.write(_get("/service/echo/two", "X-Request-Id: rid-2\r\nX-RMA-Evil: 1\r\n"))
        status, headers, body = await _response(reader)
        assert status == 200
        assert headers["x-request-id"] == "rid-2"
        assert json.loads(body)["tail"] == "two"
        assert "X-RMA-Evil" not in backend.seen[-1]["headers"]
        assert _front(fed).served == served + 2
    finally:
        writer.close()


async def test_pooled_client_keeps_reaching_the_front_door(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    """A keep-alive client (as cloudflared is) mixing traffic: every proxied request is ours."""
    backend = await backend_factory()
    reply = await fed.register(backend.url)
    front = _front(fed)
    url = f"http://127.0.0.1:{fed.client.server.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for i in range(3):
            served = front.served
            async with http.get(f"{url}/service/echo/a{i}") as resp:
                assert resp.status == 200
                assert (await resp.json())["tail"] == f"a{i}"
            assert front.served == served + 1
            async with http.get(f"{url}/api/services") as resp:  # aiohttp's, then closed
                assert resp.status == 200
                assert resp.headers["Connection"] == "close"
            async with http.post(
                f"{url}/api/worker/heartbeat",
                json={"worker_id": reply["worker_id"]},
                headers={"Authorization": f"Bearer {reply['worker_token']}"},
            ) as resp:  # the front door's, on the new connection
                assert resp.status == 200
                assert (await resp.json())["state"] == "active"
                assert "Connection" not in resp.headers  # kept alive
            async with http.get(f"{url}/service/echo/b{i}") as resp:
                assert resp.status == 200
            assert front.served == served + 3


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


# ---------------------------------------------------------------- heartbeats at the front door

_NATIVE = "/api/worker/heartbeat"
_VIA_AIOHTTP = "/api/worker/%68eartbeat"  # the same route for aiohttp's router; not ours


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: coord.test\r\nContent-Type: application/json\r\n"
        b"%bContent-Length: %d\r\n\r\n%b" % (path.encode(), extra, len(body), body)
    )


async def _exchange(fed: Fed, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await _open(fed)
    try:
        writer.write(request)
        return await _response(reader)
    finally:
        writer.close()


def _auth(token: str) -> bytes:
    return b"Authorization: Bearer %b\r\n" % token.encode()


_CASES: dict[str, tuple[bytes, str | None]] = {
    # name: (body, Authorization line: "token" for the worker's, None for none, else raw)
    "broken_json": (b"{not json", "token"),
    "empty": (b"", "token"),
    "not_an_object": (b"[]", "token"),
    "invalid_utf8": (b"\xc3\x28\xa0\xa1", "token"),
    "bad_worker_id": (b'{"worker_id": "../x"}', "token"),
    "extra_field": (b'{"worker_id": "alpha", "evil": 1}', "token"),
    "bad_field_value": (b'{"worker_id": "alpha", "cpu_pct": 900}', "token"),
    "protocol_version": (b'{"worker_id": "alpha", "protocol_version": 99}', "token"),
    "unknown_worker": (b'{"worker_id": "nobody"}', "token"),
    "wrong_token": (b'{"worker_id": "alpha"}', "Authorization: Bearer " + "x" * 43),
    "no_token": (b'{"worker_id": "alpha"}', None),
    "basic_auth": (b'{"worker_id": "alpha"}', "Authorization: Basic eDp5"),
    "raw_bytes_token": (b'{"worker_id": "alpha"}', "Authorization: Bearer \xff\xfe\xfd"),
    "misrouted": (b'{"worker_id": "alpha", "coordinator_id": "coord-other"}', "token"),
    "too_large": (b'{"worker_id": "alpha", "x": "' + b"a" * 70_000 + b'"}', "token"),
    "ok": (b'{"worker_id": "alpha", "active_requests": 3}', "token"),
}


@pytest.mark.parametrize("case", sorted(_CASES))
async def test_heartbeat_answers_as_aiohttp_did(
    fed: Fed, backend_factory: BackendFactory, case: str
) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    body, auth = _CASES[case]
    line = (
        _auth(reply["worker_token"])
        if auth == "token"
        else b""
        if auth is None
        else auth.encode("latin-1") + b"\r\n"
    )
    front = _front(fed)
    counts = {}
    answers = []
    for path in (_VIA_AIOHTTP, _NATIVE, _NATIVE + "?from=test"):
        served = front.served
        status, headers, payload = await _exchange(fed, _post(path, body, line))
        counts[path] = front.served - served
        answers.append((status, json.loads(payload), headers.get("www-authenticate")))
    assert counts == {_VIA_AIOHTTP: 0, _NATIVE: 1, _NATIVE + "?from=test": 1}
    assert answers[1] == answers[0]
    assert answers[2] == answers[0]
    assert answers[0][0] != 500


async def test_heartbeat_keeps_the_connection_and_counts(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    front = _front(fed)
    served = front.served
    metric = 'rma_heartbeats_total{outcome="ok"}'

    async def beats_ok() -> float:
        text = await (await fed.client.get("/metrics")).text()
        line = next(x for x in text.splitlines() if x.startswith(metric))
        return float(line.split()[-1])

    before = await beats_ok()
    reader, writer = await _open(fed)
    try:
        for active in (1, 2):
            body = b'{"worker_id": "alpha", "active_requests": %d}' % active
            writer.write(_post(_NATIVE, body, _auth(reply["worker_token"])))
            status, headers, payload = await _response(reader)
            assert status == 200
            assert "connection" not in headers
            assert json.loads(payload)["worker_id"] == "alpha"
        # Chunked and Expect: 100-continue, on the same connection.
        writer.write(
            b"POST /api/worker/heartbeat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n%b\r\n" % _auth(reply["worker_token"])
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        for part in (b'{"worker_id": ', b'"alpha"}'):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        status, _, payload = await _response(reader)
        assert status == 200
        assert json.loads(payload)["state"] == "active"
    finally:
        writer.close()
    assert front.served == served + 3
    assert await beats_ok() == before + 3
    assert fed.coordinator.registry.get("alpha") is not None


async def test_slow_heartbeat_body_is_408(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(client_read_timeout=0.5)
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    reader, writer = await _open(fed)
    try:
        writer.write(
            b"POST /api/worker/heartbeat HTTP/1.1\r\nHost: a\r\nContent-Length: 200\r\n"
            b'%b\r\n{"worker_id": ' % _auth(reply["worker_token"])
        )
        status, headers, body = await _response(reader)  # the body never completes
        assert status == 408
        assert json.loads(body)["error"] == "request_timeout"
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-continue"])
async def test_oversized_heartbeat_is_413_without_reading_it_all(fed: Fed, framing: str) -> None:
    served = _front(fed).served
    limit = fed.coordinator.settings.max_control_body
    reader, writer = await _open(fed)
    try:
        head = b"POST /api/worker/heartbeat HTTP/1.1\r\nHost: a\r\n"
        if framing == "chunked":
            part = b"x" * (limit + 1)
            # More than the cap, and the body never ends: the answer cannot wait for it.
            writer.write(
                head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(part), part)
            )
        elif framing == "content-length":
            writer.write(head + b"Content-Length: 100000000\r\n\r\n" + b"x" * 1000)
        else:
            writer.write(head + b"Expect: 100-continue\r\nContent-Length: 100000000\r\n\r\n")
        status, headers, body = await _response(reader)  # no "100 Continue" before it
        assert status == 413
        assert json.loads(body) == {
            "error": "body_too_large",
            "detail": f"at most {limit} bytes",
            "hop": "coordinator",
        }
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert _front(fed).served == served + 1


async def test_late_answer_on_a_pooled_connection_is_504(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    """A request without a body on a pooled connection is timed by the front door's sweep."""
    fed = await fed_factory(proxy_ttfb_timeout=0.3)
    backend = await backend_factory()
    await fed.register(backend.url, worker_id="sleepy")
    assert (await fed.client.get("/service/echo/warm")).status == 200  # pools a connection
    resp = await fed.client.get("/service/echo/slow?s=2")
    assert resp.status == 504
    body = await resp.json()
    assert body["error"] == "worker_timeout"
    assert body["worker_id"] == "sleepy"
    assert body["hop"] == "coordinator"
    assert fed.coordinator.proxy.in_flight == 0
    assert (await fed.client.get("/service/echo/after")).status == 200
    text = await (await fed.client.get("/metrics")).text()
    assert 'rma_proxy_requests_total{service="echo",status="504"} 1.0' in text


class _ClosedByPeer:
    """A transport whose peer has already closed: writing finds the connection gone."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner

    def write(self, data: bytes) -> None:
        self.inner.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_pooled_connection_the_worker_closed_is_retried_fresh(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    assert (await fed.client.get("/service/echo/warm")).status == 200
    pool = fed.coordinator.proxy._pool
    assert pool is not None
    idle = [conn for conns in pool._idle.values() for conn in conns]
    assert idle
    for conn in idle:
        assert conn.transport is not None
        conn.transport = _ClosedByPeer(conn.transport)  # type: ignore[assignment]
    resp = await fed.client.get("/service/echo/again")
    assert resp.status == 200
    assert (await resp.json())["tail"] == "again"
    assert [r["tail"] for r in backend.seen] == ["warm", "again"]
    assert fed.coordinator.proxy.in_flight == 0
