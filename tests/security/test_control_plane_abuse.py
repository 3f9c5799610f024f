"""Control-plane abuse against a real coordinator on loopback.

Every case asserts on the answer (status and JSON error) and on the state after it, read back
with the admin token: nothing registered, nothing replaced, nothing lost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.security.conftest import ADMIN, Federation, register_body

Factory = Callable[..., Awaitable[Federation]]


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    token: str | None = None,
    **kw: Any,
) -> tuple[int, dict[str, Any]]:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault("Content-Type", "application/json")
    async with http.post(url, data=data, headers=headers, **kw) as resp:
        return resp.status, await resp.json()


def _same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The legitimate worker is still registered with the same address, services and state."""
    assert set(after) == set(before), (sorted(before), sorted(after))
    for wid, old in before.items():
        new = after[wid]
        for key in ("tunnel_url", "registered_at", "state", "assigned_services", "services"):
            assert new[key] == old[key], (wid, key, old[key], new[key])


async def test_register_someone_elses_id_is_refused(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    before = await fed.snapshot(http)
    url = f"{fed.url}/api/worker/register"
    hijack = register_body("http://127.0.0.1:9", worker_id="w-legit")
    real = fed.worker["worker_token"]
    # Its last character differs (one in 16 tokens ends with "A").
    near = real[:-1] + ("B" if real.endswith("A") else "A")
    for token in (None, "x" * 43, near):
        status, body = await _post(
            http, url, {**hijack, "worker_token": token} if token else hijack
        )
        assert (status, body["error"]) == (403, "forbidden"), body
    _same(before, await fed.snapshot(http))


async def test_heartbeat_and_unregister_someone_else_are_refused(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    before = await fed.snapshot(http)
    beat = {"worker_id": "w-legit", "state": "draining"}
    for token in (None, "not-the-token", ADMIN):
        status, body = await _post(http, f"{fed.url}/api/worker/heartbeat", beat, token)
        assert (status, body["error"]) == (401, "unauthorized"), body
    for token in (None, "not-the-token", fed.worker["worker_token"] + "x"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.delete(f"{fed.url}/api/worker/w-legit", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
    after = await fed.snapshot(http)
    _same(before, after)
    assert after["w-legit"]["state"] == "active"  # the forged "draining" beat changed nothing


async def test_token_replay_after_unregister(fed: Federation, http: aiohttp.ClientSession) -> None:
    url = f"{fed.url}/api/worker/register"
    status, first = await _post(http, url, register_body("http://127.0.0.1:10", worker_id="w-r"))
    assert status == 200
    old = first["worker_token"]
    auth = {"Authorization": f"Bearer {old}"}
    async with http.delete(f"{fed.url}/api/worker/w-r", headers=auth) as resp:
        assert resp.status == 200
    # The token of a removed worker opens nothing: heartbeats and deletes are 404.
    status, body = await _post(http, f"{fed.url}/api/worker/heartbeat", {"worker_id": "w-r"}, old)
    assert (status, body["error"]) == (404, "unknown_worker")
    async with http.delete(f"{fed.url}/api/worker/w-r", headers=auth) as resp:
        assert resp.status == 404
    # The id is registered afresh: it gets a new token, and the old one stays dead.
    status, second = await _post(http, url, register_body("http://127.0.0.1:11", worker_id="w-r"))
    assert status == 200
    assert second["worker_token"] != old
    status, body = await _post(http, f"{fed.url}/api/worker/heartbeat", {"worker_id": "w-r"}, old)
    assert (status, body["error"]) == (401, "unauthorized")
    replay = register_body("http://127.0.0.1:12", worker_id="w-r", worker_token=old)
    status, body = await _post(http, url, replay)
    assert (status, body["error"]) == (403, "forbidden")
    after = await fed.snapshot(http)
    assert after["w-r"]["tunnel_url"] == "http://127.0.0.1:11"
    assert "w-legit" in after


async def test_oversized_bodies_are_413_declared_or_streamed(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    before = await fed.snapshot(http)
    big = json.dumps(
        register_body("http://127.0.0.1:13", agent_version="v", padding="x" * 70_000)
    ).encode()

    async def chunks() -> Any:  # no Content-Length: the cap must hold on the streamed body too
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    for path in ("/api/worker/register", "/api/worker/heartbeat"):
        status, body = await _post(http, fed.url + path, big)
        assert (status, body["error"]) == (413, "body_too_large")
        async with http.post(
            fed.url + path, data=chunks(), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "body_too_large"
    _same(before, await fed.snapshot(http))


async def test_deep_json_nesting(fed: Federation, http: aiohttp.ClientSession) -> None:
    before = await fed.snapshot(http)
    url = f"{fed.url}/api/worker/register"
    # 30,000 levels fit under the 64 KiB cap: the parser itself must refuse them cleanly.
    deep = b"[" * 30_000 + b"]" * 30_000
    status, body = await _post(http, url, deep)
    assert status in (400, 422), body
    nested = (
        b'{"worker_type":"cpu","tunnel_url":"http://127.0.0.1:14","capabilities":'
        + b'{"a":' * 10_000
        + b"1"
        + b"}" * 10_001
    )
    status, body = await _post(http, url, nested)
    assert status in (400, 422), body
    # 100,000 levels: refused by size before any parsing.
    status, body = await _post(http, url, b"[" * 100_000 + b"]" * 100_000)
    assert (status, body["error"]) == (413, "body_too_large")
    # The proxy reads JSON bodies to route by "model": deep nesting must not break it either.
    proxied = b'{"model":"m","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with http.post(
        f"{fed.url}/service/echo/deep", data=proxied, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_bytes"] == len(proxied)
    _same(before, await fed.snapshot(http))


async def test_invalid_utf8_everywhere(fed: Federation, http: aiohttp.ClientSession) -> None:
    before = await fed.snapshot(http)
    url = f"{fed.url}/api/worker/register"
    bad = b'{"worker_type":"cpu","tunnel_url":"http://127.0.0.1:15","agent_version":"\xff\xfe"}'
    status, body = await _post(http, url, bad)
    assert status in (400, 422), body
    status, body = await _post(http, f"{fed.url}/api/worker/heartbeat", b"\xc3\x28\xa0\xa1")
    assert status in (400, 422), body

    # Raw bytes in a header and in the path, sent on a raw socket (no client would encode them).
    host, port = fed.url.removeprefix("http://").split(":")
    for request in (
        b"POST /api/worker/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd"
        b"\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n"
        b'{"worker_id":"w-legit"}',
        b"GET /service/echo/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /api/worker/w-\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /api/worker/w-legit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
        b"GET /api/workers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\x28\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        writer.close()
        assert status < 500, head
    _same(before, await fed.snapshot(http))


async def test_ten_thousand_services_in_one_registration(
    fed_factory: Factory, http: aiohttp.ClientSession
) -> None:
    # A large body cap, so that the list itself (not the size) is what gets refused.
    fed = await fed_factory(max_control_body=4 * 1024 * 1024)
    before = await fed.snapshot(http)
    services = [{"name": f"s{i}", "models": ["m"]} for i in range(10_000)]
    body = register_body("http://127.0.0.1:16", services=services)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, reply = await _post(http, f"{fed.url}/api/worker/register", body)
    assert (status, reply["error"]) == (422, "invalid_request")
    assert loop.time() - started < 2.0
    assert len(reply["detail"]) <= 20  # the error itself is bounded too
    # The same list under the default 64 KiB cap is refused by size.
    small = await fed_factory()
    status, reply = await _post(http, f"{small.url}/api/worker/register", body)
    assert (status, reply["error"]) == (413, "body_too_large")
    _same(before, await fed.snapshot(http))
    assert len(await small.snapshot(http)) == 1


async def test_join_token_and_admin_views_need_their_tokens(
    fed_factory: Factory, http: aiohttp.ClientSession
) -> None:
    fed = await fed_factory(worker_join_token="join-token-0123456789abcdef")
    before = await fed.snapshot(http)
    body = register_body("http://127.0.0.1:17")
    for token in (None, "wrong", ADMIN, "join-token-0123456789abcde"):
        status, reply = await _post(http, f"{fed.url}/api/worker/register", body, token)
        assert (status, reply["error"]) == (401, "unauthorized")
    for token in (None, "wrong", fed.worker["worker_token"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.get(f"{fed.url}/api/workers", headers=headers) as resp:
            assert resp.status == 401
    _same(before, await fed.snapshot(http))
