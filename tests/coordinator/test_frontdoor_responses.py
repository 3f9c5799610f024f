"""The front door's fast path against workers that answer in unusual ways, and its route cache.

A scripted worker (a raw asyncio server) answers each request with given bytes, so interim
responses, split heads and oversized heads reach the coordinator exactly as written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import BackendFactory, Fed

_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class ScriptedWorker:
    """Answers the n-th request (on any connection) with ``answers[n]``, in pieces."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                pieces = self.answers[min(len(self.requests), len(self.answers)) - 1]
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    if len(pieces) > 1:
                        await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[list[list[bytes]]], Any]]:
    workers: list[ScriptedWorker] = []

    async def start(answers: list[list[bytes]]) -> ScriptedWorker:
        worker = ScriptedWorker(answers)
        worker.server = await asyncio.start_server(worker.serve, "127.0.0.1", 0)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        assert worker.server is not None
        worker.server.close()
        await worker.server.wait_closed()


async def test_interim_responses_are_skipped_and_the_connection_reused(
    fed: Fed, scripted: Any
) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )
    worker = await scripted([[interim + _OK], [_OK]])
    await fed.register(worker.url)
    for _ in range(3):
        resp = await fed.client.get("/service/echo/x")
        assert resp.status == 200
        assert await resp.read() == b'{"ok":true}'
        assert "Link" not in resp.headers  # an interim response's headers are not the answer's
        assert resp.headers["X-Request-Id"]
    # One pooled connection carried all three exchanges (one parser per connection).
    assert worker.connections == 1
    assert len(worker.requests) == 3
    assert fed.coordinator.proxy.in_flight == 0


async def test_a_head_written_byte_by_byte_is_relayed_whole(fed: Fed, scripted: Any) -> None:
    response = (
        b"HTTP/1.1 201 Created\r\nX-Tab:\tvalue with trailing space \r\n"
        b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    )
    worker = await scripted([[bytes([b]) for b in response]])
    await fed.register(worker.url)
    for _ in range(2):
        resp = await fed.client.get("/service/echo/split")
        assert resp.status == 201
        assert await resp.read() == b"hello"
        assert resp.headers["X-Tab"] == "value with trailing space"
        assert resp.headers["Content-Type"] == "text/plain"


async def test_a_response_head_past_64_kib_is_a_bad_response(fed: Fed, scripted: Any) -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * (80 * 1024)
    worker = await scripted([[endless[i : i + 8192] for i in range(0, len(endless), 8192)]])
    await fed.register(worker.url, worker_id="chatty")
    resp = await fed.client.get("/service/echo/x")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "worker_bad_response"
    assert body["worker_id"] == "chatty"
    assert fed.coordinator.proxy.in_flight == 0


async def test_a_malformed_head_after_a_good_exchange_is_a_bad_response(
    fed: Fed, scripted: Any
) -> None:
    worker = await scripted([[_OK], [b"HTTP/1.1 200 OK\r\nBad Header : x\r\n\r\n"]])
    await fed.register(worker.url)
    assert (await fed.client.get("/service/echo/a")).status == 200
    resp = await fed.client.get("/service/echo/b")
    assert resp.status == 502
    assert (await resp.json())["error"] == "worker_bad_response"


async def test_remembered_routes_follow_the_registry(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    """Targets are remembered per catalog service; other services are checked every time."""
    fed = await fed_factory(catalog_allow_unlisted=True)
    backend = await backend_factory()
    reply = await fed.register(backend.url, services=[{"name": "echo"}, {"name": "custom"}])
    for _ in range(2):
        resp = await fed.client.get("/service/custom/a?q=1")
        assert resp.status == 200
        assert (await resp.json())["query"] == "q=1"
        assert (await fed.client.get("/service/echo/a")).status == 200
    resp = await fed.client.delete(
        f"/api/worker/{reply['worker_id']}",
        headers={"Authorization": f"Bearer {reply['worker_token']}"},
    )
    assert resp.status in (200, 204)
    # The unlisted service is gone with its only worker: unknown again, not "no workers".
    resp = await fed.client.get("/service/custom/a?q=1")
    assert resp.status == 404
    assert (await resp.json())["error"] == "unknown_service"
    # The catalog service stays known, with no worker to serve it.
    resp = await fed.client.get("/service/echo/a")
    assert resp.status == 503
    assert (await resp.json())["error"] == "no_ready_workers"


async def test_head_requests_relay_the_head_and_no_body(fed: Fed, scripted: Any) -> None:
    """A HEAD answer announces a length it does not send; the next request is not confused."""
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    worker = await scripted([[head_answer], [_OK], [head_answer], [_OK]])
    await fed.register(worker.url)
    for _ in range(2):
        resp = await fed.client.head("/service/echo/x")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.read() == b""
        resp = await fed.client.get("/service/echo/y")
        assert resp.status == 200
        assert await resp.read() == b'{"ok":true}'
    assert [r.split(b" ", 1)[0] for r in worker.requests] == [b"HEAD", b"GET", b"HEAD", b"GET"]
    assert fed.coordinator.proxy.in_flight == 0


async def test_remembered_routes_are_per_coordinator(
    fed_factory: Any, backend_factory: BackendFactory, tmp_path: Any
) -> None:
    """Two coordinators in one process (tests, embedded ones) never share remembered routes."""
    first = await fed_factory()
    backend = await backend_factory()
    await first.register(backend.url)
    assert (await first.client.get("/service/echo/x")).status == 200  # remembered by `first`
    catalog = tmp_path / "catalog.json"
    catalog.write_text('[{"name": "ocr", "aliases": ["echo-not"]}]', encoding="utf-8")
    second = await fed_factory(service_catalog_file=catalog)
    resp = await second.client.get("/service/echo/x")
    assert resp.status == 404  # no `echo` in this catalog
    assert (await resp.json())["available"] == ["ocr"]
