"""The proxy path: real client -> coordinator -> real backend servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import GATEWAY_KEY, BackendFactory, Fed


async def raw_request(fed: Fed, method: str, raw: str, **kw: Any) -> tuple[int, bytes]:
    """Send ``raw`` exactly as written (the test client would normalise it)."""
    url = URL(str(fed.client.make_url("/")).rstrip("/") + raw, encoded=True)
    async with aiohttp.ClientSession() as session, session.request(method, url, **kw) as resp:
        return resp.status, await resp.read()


def _dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_method_path_query_and_body_are_kept(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    raw = "/service/echo/a/b%20c/d?x=1&y=%2F&x=2&empty="
    status, _ = await raw_request(fed, "PUT", raw, data=b"payload-bytes")
    assert status == 200
    seen = backend.seen[-1]
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/service/echo/a/b%20c/d?x=1&y=%2F&x=2&empty="
    assert seen["body"] == b"payload-bytes"
    assert seen["headers"]["X-RMA-Gateway-Key"] == GATEWAY_KEY
    # A path with no tail reaches the service root.
    resp = await fed.client.get("/service/echo")
    assert resp.status == 200
    assert backend.seen[-1]["raw_path"] == "/service/echo/"


async def test_alias_resolves_to_canonical_service(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(
        backend.url,
        worker_type="gpu",
        gpus=[{"index": 0, "name": "A100", "memory_total_mb": 40960, "memory_free_mb": 40000}],
        services=[{"name": "llm-inference"}],
    )
    resp = await fed.client.post("/service/llm/v1/chat/completions", json={"messages": []})
    assert resp.status == 200
    assert backend.seen[-1]["service"] == "llm-inference"
    assert backend.seen[-1]["tail"] == "v1/chat/completions"


async def test_headers_hop_by_hop_internal_and_forwarded(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    resp = await fed.client.get(
        "/service/echo/h",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "secret",
            "Keep-Alive": "timeout=5",
            "X-RMA-Gateway-Key": "forged-by-client",
            "X-RMA-Anything": "forged",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Request-Id": "req-123",
            "Authorization": "Bearer end-to-end",
            "X-Custom": "kept",
        },
    )
    assert resp.status == 200
    got = backend.seen[-1]["headers"]
    assert "X-Drop-Me" not in got
    assert "Keep-Alive" not in got
    assert got["X-RMA-Gateway-Key"] == GATEWAY_KEY
    assert "X-RMA-Anything" not in got
    assert got["X-Forwarded-For"] == "127.0.0.1"
    assert got["X-Forwarded-Host"] != "evil.example"
    assert got["X-Forwarded-Proto"] == "http"
    assert got["X-Request-Id"] == "req-123"
    assert got["Authorization"] == "Bearer end-to-end"
    assert got["X-Custom"] == "kept"
    # Response side: the request id comes back, hop-by-hop headers named by Connection go.
    assert resp.headers["X-Request-Id"] == "req-123"
    assert resp.headers["X-Backend"] == "backend"
    assert "X-Secret-Hop" not in resp.headers


async def test_request_id_generated_when_absent_or_invalid(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    resp = await fed.client.get("/service/echo/r", headers={"X-Request-Id": "bad id with spaces"})
    rid = resp.headers["X-Request-Id"]
    assert rid != "bad id with spaces"
    assert len(rid) == 32
    assert backend.seen[-1]["headers"]["X-Request-Id"] == rid


async def test_sse_streams_token_by_token(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    started = time.monotonic()
    arrivals: list[float] = []
    async with fed.client.post("/service/echo/sse?n=4&gap=0.25", json={"stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        async for chunk in resp.content.iter_any():
            if chunk.strip():
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 4
    # The first token arrives long before the stream ends: nothing was buffered.
    assert arrivals[0] < 0.2
    assert arrivals[-1] - arrivals[0] > 0.6


async def test_large_bodies_stream_both_ways(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)

    async def upload() -> Any:
        for _ in range(64):
            yield b"y" * 65536

    resp = await fed.client.post("/service/echo/upload", data=upload())
    assert resp.status == 200
    assert (await resp.json())["body_bytes"] == 64 * 65536
    resp = await fed.client.get("/service/echo/big")
    assert len(await resp.read()) == 2 * 1024 * 1024


async def test_backend_errors_pass_through_unchanged(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    for code in (400, 404, 500, 503):
        resp = await fed.client.get(f"/service/echo/status?code={code}")
        assert resp.status == code
        assert (await resp.json()) == {"error": "backend says no"}


async def test_retry_on_dead_worker_and_strikes(fed: Fed, backend_factory: BackendFactory) -> None:
    live = await backend_factory("live")
    dead = await fed.register(_dead_url(), worker_id="dead")
    await fed.register(live.url, worker_id="live")
    record = fed.coordinator.registry.get("dead")
    assert record is not None
    # Picks are random among equally loaded workers: send until the dead one has been tried
    # STRIKE_LIMIT (3) times. Every request succeeds meanwhile (retried on the live worker).
    sent = 0
    while record.health(3) != "suspect":
        assert sent < 200, "the dead worker never reached the strike limit"
        resp = await fed.client.post("/service/echo/x", json={"a": 1})
        assert resp.status == 200
        assert (await resp.json())["backend"] == "live"
        sent += 1
    assert record.strikes == 3
    # Out of routing now: the next requests never try it (no more strikes).
    for _ in range(10):
        resp = await fed.client.post("/service/echo/x", json={"a": 1})
        assert resp.status == 200
    assert record.strikes == 3
    # Its next heartbeat proves it alive again and clears the strikes.
    await fed.beat(dead)
    assert record.health(3) == "active"


async def test_only_dead_worker_answers_502(fed: Fed) -> None:
    await fed.register(_dead_url(), worker_id="gone")
    resp = await fed.client.get("/service/echo/x")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "worker_unreachable"
    assert body["worker_id"] == "gone"
    assert body["hop"] == "coordinator"


async def test_all_full_is_fast_503(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reg = await fed.register(backend.url, services=[{"name": "echo", "max_concurrency": 1}])
    record = fed.coordinator.registry.get(reg["worker_id"])
    assert record is not None
    slow = asyncio.create_task(fed.client.get("/service/echo/slow?s=1"))
    for _ in range(500):  # until the slow request holds the worker's only slot
        if record.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert record.in_flight == 1
    resp = await fed.client.get("/service/echo/x")
    # Answered at once, not queued behind the request holding the only slot.
    assert not slow.done()
    assert resp.status == 503
    assert (await resp.json())["error"] == "all_workers_busy"
    assert resp.headers["Retry-After"] == "1"
    assert (await slow).status == 200
    assert (await fed.client.get("/service/echo/x")).status == 200


async def test_least_outstanding_spreads_load(fed: Fed, backend_factory: BackendFactory) -> None:
    a, b = await backend_factory("a"), await backend_factory("b")
    await fed.register(a.url, worker_id="a")
    await fed.register(b.url, worker_id="b")
    slow = [asyncio.create_task(fed.client.get("/service/echo/slow?s=0.4")) for _ in range(4)]
    await asyncio.sleep(0.15)
    assert {r["backend"] for r in a.seen + b.seen} == {"a", "b"}
    assert len(a.seen) == len(b.seen) == 2
    for task in slow:
        assert (await task).status == 200


async def test_coordinator_concurrency_cap(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(max_inflight=2)
    backend = await backend_factory()
    await fed.register(backend.url)
    slow = [asyncio.create_task(fed.client.get("/service/echo/slow?s=0.4")) for _ in range(2)]
    await asyncio.sleep(0.15)
    resp = await fed.client.get("/service/echo/x")
    assert resp.status == 503
    assert (await resp.json())["error"] == "overloaded"
    for task in slow:
        assert (await task).status == 200


async def test_time_to_first_byte_timeout(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(proxy_ttfb_timeout=0.3)
    backend = await backend_factory()
    await fed.register(backend.url, worker_id="sleepy")
    resp = await fed.client.get("/service/echo/slow?s=2")
    assert resp.status == 504
    body = await resp.json()
    assert body["error"] == "worker_timeout"
    assert body["worker_id"] == "sleepy"


async def test_worker_dies_mid_stream(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    async with fed.client.get("/service/echo/die-mid-stream") as resp:
        assert resp.status == 200
        received = bytearray()

        async def drain() -> None:
            async for chunk in resp.content.iter_any():
                received.extend(chunk)

        with pytest.raises(aiohttp.ClientPayloadError):
            await drain()
    assert b"data: first" in received
    assert b"event: error" in received
    assert b"worker_stream_broken" in received
    # The next request is served normally.
    assert (await fed.client.get("/service/echo/after")).status == 200


async def test_model_routing(fed: Fed, backend_factory: BackendFactory) -> None:
    gpu = [{"index": 0, "name": "L4", "memory_total_mb": 24000, "memory_free_mb": 20000}]
    a, b = await backend_factory("a"), await backend_factory("b")
    await fed.register(
        a.url,
        worker_type="gpu",
        gpus=gpu,
        services=[{"name": "llm-inference", "models": ["llama3:latest"]}],
    )
    await fed.register(
        b.url,
        worker_type="gpu",
        gpus=gpu,
        services=[{"name": "llm-inference", "models": ["qwen2.5:7b"]}],
    )
    for _ in range(5):
        resp = await fed.client.post(
            "/service/llm/v1/chat/completions", json={"model": "qwen2.5:7b"}
        )
        assert (await resp.json())["backend"] == "b"
        resp = await fed.client.post("/service/llm/api/chat", json={"model": "llama3"})
        assert (await resp.json())["backend"] == "a"
    resp = await fed.client.post("/service/llm/api/chat", json={"model": "mistral"})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "model_not_available"
    assert "qwen2.5:7b" in body["available"]
    # No model named: any worker of the service.
    resp = await fed.client.post("/service/llm/api/chat", json={"messages": []})
    assert resp.status == 200
    services = await (await fed.client.get("/api/services")).json()
    llm = next(s for s in services["services"] if s["name"] == "llm-inference")
    assert "qwen2.5:7b" in llm["models"]


@pytest.mark.parametrize(
    "path",
    ["/service/echo/../../api/workers", "/service/echo/%2e%2e/x", "/service/echo/a/./b"],
)
async def test_dot_segments_refused(fed: Fed, backend_factory: BackendFactory, path: str) -> None:
    backend = await backend_factory()
    await fed.register(backend.url)
    status, _ = await raw_request(fed, "GET", path)
    assert status in (400, 404)
    assert backend.seen == []


async def test_unknown_service_lists_available(fed: Fed) -> None:
    resp = await fed.client.get("/service/nope/x")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "unknown_service"
    assert "echo" in body["available"]
    resp = await fed.client.get("/service/echo/x")
    assert resp.status == 503
    assert (await resp.json())["error"] == "no_ready_workers"
