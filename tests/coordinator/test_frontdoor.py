"""The front door: routing per connection, hand-off to aiohttp, and raw HTTP/1.1 edge cases."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from coordinator.frontdoor import FrontServer, front_server, route_of
from tests.conftest import GATEWAY_KEY, BackendFactory, Fed


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
        (b"POST /api/worker/register HTTP/1.1\r\n", True),
        (b"POST /api/worker/register?x=1 HTTP/1.1\r\n", True),
        (b"POST /api/worker/", None),
        (b"POST /api/worker/reg", None),
        (b"POST /api/worker/register", None),
        (b"POST /api/worker/registerx HTTP/1.1\r\n", False),
        (b"POST /api/worker/register/ HTTP/1.1\r\n", False),
        (b"POST /api/worker/registe HTTP/1.1\r\n", False),
        (b"POST /api/worker/regX", False),
        (b"GET /api/worker/register HTTP/1.1\r\n", False),
        (b"PUT /api/worker/register HTTP/1.1\r\n", False),
        (b"POST /api/worker/w-1 HTTP/1.1\r\n", False),
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
_CONTROL_PATHS = [b"/api/worker/heartbeat", b"/api/worker/register"]


def _post(path: str, body: bytes, extra: bytes = b"", host: bytes | None = b"coord.test") -> bytes:
    host_line = b"" if host is None else b"Host: %b\r\n" % host
    return (
        b"POST %b HTTP/1.1\r\n%bContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n%b"
        % (
            path.encode(),
            host_line,
            extra,
            len(body),
            body,
        )
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


@pytest.mark.parametrize("path", _CONTROL_PATHS)
async def test_slow_control_body_is_408(
    fed_factory: Any, backend_factory: BackendFactory, path: bytes
) -> None:
    fed = await fed_factory(client_read_timeout=0.5)
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    served = _front(fed).served
    reader, writer = await _open(fed)
    try:
        writer.write(
            b"POST %b HTTP/1.1\r\nHost: a\r\nContent-Length: 200\r\n"
            b'%b\r\n{"worker_id": ' % (path, _auth(reply["worker_token"]))
        )
        status, headers, body = await _response(reader)  # the body never completes
        assert status == 408
        assert json.loads(body)["error"] == "request_timeout"
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert _front(fed).served == served + 1
    assert len(fed.coordinator.registry) == 1


@pytest.mark.parametrize("path", _CONTROL_PATHS)
@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-continue"])
async def test_oversized_control_body_is_413_without_reading_it_all(
    fed: Fed, framing: str, path: bytes
) -> None:
    served = _front(fed).served
    limit = fed.coordinator.settings.max_control_body
    reader, writer = await _open(fed)
    try:
        head = b"POST %b HTTP/1.1\r\nHost: a\r\n" % path
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


# ---------------------------------------------------------------- registrations at the front door

_REGISTER = "/api/worker/register"
_REGISTER_VIA_AIOHTTP = "/api/worker/%72egister"  # the same route for aiohttp's router; not ours
_SHOWN = ("content-type", "www-authenticate", "retry-after")

Answer = tuple[int, dict[str, Any], dict[str, str]]


def _register_body(tunnel_url: str, **extra: Any) -> bytes:
    body = {
        "worker_type": "cpu",
        "tunnel_url": tunnel_url,
        "gateway_key": GATEWAY_KEY,
        "services": [{"name": "echo"}],
        **extra,
    }
    return json.dumps(body).encode()


async def _register_both_ways(
    fed: Fed, body: bytes, extra: bytes = b"", host: bytes | None = b"coord.test"
) -> list[Answer]:
    """The answers of aiohttp's route, then of the front door (without and with a query)."""
    front = _front(fed)
    answers = []
    for path, ours in ((_REGISTER_VIA_AIOHTTP, 0), (_REGISTER, 1), (_REGISTER + "?from=test", 1)):
        served = front.served
        request = _post(path, body, extra, host)
        if host is None:  # aiohttp refuses an HTTP/1.1 request without Host (400, not JSON)
            request = request.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        status, headers, payload = await _exchange(fed, request)
        assert front.served == served + ours, path  # who answered
        shown = {k: headers[k] for k in _SHOWN if k in headers}
        answers.append((status, json.loads(payload), shown))
    return answers


async def _metric(fed: Fed, prefix: str) -> float:
    text = await (await fed.client.get("/metrics")).text()
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix)), 0.0)


_REFUSED: dict[str, bytes] = {
    "broken_json": b"{not json",
    "empty": b"",
    "not_an_object": b"[]",
    "invalid_utf8": b"\xc3\x28\xa0\xa1",
    "deep_nesting": b"[" * 30_000 + b"]" * 30_000,
    "missing_field": b'{"worker_type": "cpu"}',
    "extra_field": _register_body("http://127.0.0.1:9", evil=1),
    "bad_worker_id": _register_body("http://127.0.0.1:9", worker_id="../x"),
    "protocol_version": _register_body("http://127.0.0.1:9", protocol_version=99),
    "metadata_tunnel_url": _register_body("http://169.254.169.254"),
    "credentials_tunnel_url": _register_body("https://a@b.trycloudflare.com"),
    "path_tunnel_url": _register_body("http://127.0.0.1:9/x"),
    "someone_elses_id": _register_body("http://127.0.0.1:9", worker_id="alpha"),
    "wrong_token": _register_body("http://127.0.0.1:9", worker_id="alpha", worker_token="y" * 43),
    "too_large": _register_body("http://127.0.0.1:9", padding="x" * 70_000),
}


@pytest.mark.parametrize("case", sorted(_REFUSED))
async def test_refused_registration_answers_as_aiohttp_does(
    fed: Fed, backend_factory: BackendFactory, case: str
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url, worker_id="alpha")
    answers = await _register_both_ways(fed, _REFUSED[case])
    assert answers[1] == answers[0]
    assert answers[2] == answers[0]
    status, body, headers = answers[0]
    assert 400 <= status < 500
    assert body["hop"] == "coordinator"
    assert headers["content-type"] == "application/json"
    assert [view.worker_id for view in fed.coordinator.registry.views()] == ["alpha"]
    record = fed.coordinator.registry.get("alpha")
    assert record is not None
    assert record.tunnel_url == backend.url  # not moved


async def test_accepted_registration_answers_as_aiohttp_does(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    answers = await _register_both_ways(fed, _register_body(backend.url))
    assert len({body["worker_id"] for _, body, _ in answers}) == 3
    assert len(fed.coordinator.registry) == 3
    secret = ("worker_id", "worker_token")
    same = [(s, {k: v for k, v in b.items() if k not in secret}, h) for s, b, h in answers]
    assert same[0][0] == 200
    assert same[0][1]["coordinator_url"] == "http://coord.test"
    assert same[1] == same[0]
    assert same[2] == same[0]
    # Again with the worker's token, each way: the same worker, id and token kept.
    first = answers[1][1]
    again = _register_body(
        backend.url, worker_id=first["worker_id"], worker_token=first["worker_token"]
    )
    for status, body, _ in await _register_both_ways(fed, again):
        assert status == 200
        assert (body["worker_id"], body["worker_token"]) == (
            first["worker_id"],
            first["worker_token"],
        )
    assert len(fed.coordinator.registry) == 3
    assert await _metric(fed, 'rma_registrations_total{outcome="new"}') == 3
    assert await _metric(fed, 'rma_registrations_total{outcome="replaced"}') == 3


async def test_registrations_keep_the_connection(fed: Fed, backend_factory: BackendFactory) -> None:
    old, new = await backend_factory("old"), await backend_factory("new")
    front = _front(fed)
    served = front.served
    reader, writer = await _open(fed)
    try:
        writer.write(_post(_REGISTER, _register_body(old.url, worker_id="alpha")))
        status, headers, payload = await _response(reader)
        assert status == 200
        assert "connection" not in headers
        reply = json.loads(payload)
        assert reply["worker_id"] == "alpha"
        writer.write(_get("/service/echo/x"))
        assert json.loads((await _response(reader))[2])["backend"] == "old"
        # With the worker's token it moves to a new address (chunked, Expect: 100-continue).
        body = _register_body(new.url, worker_id="alpha", worker_token=reply["worker_token"])
        writer.write(
            b"POST /api/worker/register HTTP/1.1\r\nHost: coord.test\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        half = len(body) // 2
        for part in (body[:half], body[half:]):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        status, headers, payload = await _response(reader)
        assert status == 200
        assert "connection" not in headers
        again = json.loads(payload)
        assert (again["worker_id"], again["worker_token"]) == ("alpha", reply["worker_token"])
        writer.write(_get("/service/echo/y"))
        assert json.loads((await _response(reader))[2])["backend"] == "new"
        writer.write(_post(_NATIVE, b'{"worker_id": "alpha"}', _auth(reply["worker_token"])))
        status, headers, _ = await _response(reader)
        assert status == 200
        assert "connection" not in headers
    finally:
        writer.close()
    assert front.served == served + 5
    assert len(fed.coordinator.registry) == 1
    assert await _metric(fed, 'rma_registrations_total{outcome="new"}') == 1
    assert await _metric(fed, 'rma_registrations_total{outcome="replaced"}') == 1


async def test_pipelined_registrations(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    front = _front(fed)
    served = front.served
    reader, writer = await _open(fed)
    try:
        writer.write(  # one packet
            _post(_REGISTER, _register_body(backend.url, worker_id="p1"))
            + _post(_REGISTER + "?x=1", _register_body(backend.url, worker_id="p2"))
            + _post(_NATIVE, b'{"worker_id": "alpha"}', _auth(reply["worker_token"]))
            + _get("/service/echo/after")
        )
        answers = [await _response(reader) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200] * 4
        assert all("connection" not in headers for _, headers, _ in answers)
        ids = [json.loads(payload)["worker_id"] for _, _, payload in answers[:3]]
        assert ids == ["p1", "p2", "alpha"]
        assert json.loads(answers[3][2])["tail"] == "after"
        # Behind a slow proxied request, in a later packet: queued, then answered here.
        writer.write(_get("/service/echo/slow?s=0.2"))
        await asyncio.sleep(0.05)
        writer.write(_post(_REGISTER, _register_body(backend.url, worker_id="p3")))
        assert json.loads((await _response(reader))[2])["tail"] == "slow"
        status, headers, payload = await _response(reader)
        assert (status, json.loads(payload)["worker_id"]) == (200, "p3")
        assert "connection" not in headers
        # Another method on the path is aiohttp's (405), which then closes the connection.
        writer.write(_get(_REGISTER))
        status, headers, payload = await _response(reader)
        assert (status, json.loads(payload)["error"]) == (405, "method_not_allowed")
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert front.served == served + 6
    assert {"alpha", "p1", "p2", "p3"} == {v.worker_id for v in fed.coordinator.registry.views()}


async def test_join_token_at_the_front_door(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    join = "join-secret-0123456789"
    fed = await fed_factory(worker_join_token=join)
    backend = await backend_factory()
    body = _register_body(backend.url)
    for line in (
        b"",
        _auth("wrong"),
        _auth(join[:-1]),
        b"Authorization: Basic eDp5\r\n",
        b"Authorization: Bearer \xff\xfe\xfd\r\n",
    ):
        answers = await _register_both_ways(fed, body, line)
        assert answers[0][0] == 401
        assert answers[0][1]["error"] == "unauthorized"
        assert answers[0][2]["www-authenticate"] == "Bearer"
        assert answers[1] == answers[0]
        assert answers[2] == answers[0]
    assert len(fed.coordinator.registry) == 0
    answers = await _register_both_ways(fed, body, _auth(join))
    assert [status for status, _, _ in answers] == [200] * 3
    assert len(fed.coordinator.registry) == 3
    assert await _metric(fed, 'rma_registrations_total{outcome="unauthorized"}') == 15


async def test_registration_rate_limit_at_the_front_door(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(register_rate_limit=0.01)  # one now, the next in 100 s
    backend = await backend_factory()
    reader, writer = await _open(fed)
    try:
        answers = []
        for _ in range(3):
            writer.write(_post(_REGISTER, _register_body(backend.url)))
            answers.append(await _response(reader))
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200, 503, 503]
    _, headers, payload = answers[1]
    assert headers["retry-after"] == str(fed.coordinator.settings.retry_after)
    assert "connection" not in headers  # kept alive: the agent retries on it
    assert json.loads(payload)["error"] == "register_busy"
    status, aio_headers, aio_payload = await _exchange(
        fed, _post(_REGISTER_VIA_AIOHTTP, _register_body(backend.url))
    )
    assert (status, aio_headers["retry-after"], aio_payload) == (
        503,
        headers["retry-after"],
        payload,
    )
    assert len(fed.coordinator.registry) == 1
    assert await _metric(fed, 'rma_registrations_total{outcome="shed"}') == 3


@pytest.mark.parametrize(
    ("host", "extra", "expected"),
    [
        (b"coord.test", b"", "http://coord.test"),
        (b"coord.test:8443", b"X-Forwarded-Proto: https\r\n", "https://coord.test:8443"),
        (b"coord.test", b"X-Forwarded-Proto: HTTPS\r\n", "https://coord.test"),
        (b"coord.test", b"X-Forwarded-Proto: gopher\r\n", "http://coord.test"),
        (b"coord.test", b"X-Forwarded-Proto: \r\n", "http://coord.test"),
        (
            b"coord.test",
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Proto: https\r\n",
            "http://coord.test",
        ),
        (b"[::1]:8080", b"", "http://[::1]:8080"),
        (b"evil.test/x?y", b"", "http://127.0.0.1"),
        (b"\xff.test", b"", "http://127.0.0.1"),
        (b"", b"", "http://127.0.0.1"),
        (None, b"", "http://127.0.0.1"),  # no Host: the address the request arrived on
    ],
)
async def test_coordinator_url_is_the_same_both_ways(
    fed: Fed, backend_factory: BackendFactory, host: bytes | None, extra: bytes, expected: str
) -> None:
    backend = await backend_factory()
    answers = await _register_both_ways(fed, _register_body(backend.url), extra, host)
    assert [body["coordinator_url"] for _, body, _ in answers] == [expected] * 3


async def test_configured_coordinator_url_wins_both_ways(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(coordinator_public_url="https://coord.example.org/")
    backend = await backend_factory()
    extra = b"X-Forwarded-Proto: http\r\n"
    answers = await _register_both_ways(fed, _register_body(backend.url), extra, b"other.test")
    assert [body["coordinator_url"] for _, body, _ in answers] == ["https://coord.example.org"] * 3
