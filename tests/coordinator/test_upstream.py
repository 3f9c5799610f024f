"""The pooled upstream client on its own: typed connect failures and the Host header."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from coordinator.upstream import ConnectFailed, ConnectTimedOut, UpstreamPool


async def test_a_connect_that_times_out_is_a_connect_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", never)
    pool = UpstreamPool(connect_timeout=0.05, read_timeout=1.0)
    with pytest.raises(ConnectTimedOut) as info:
        await pool.request("GET", ("http", "127.0.0.1", 9), "/", [], None)
    assert isinstance(info.value, ConnectFailed)  # callers of ConnectFailed still catch it
    await pool.close()


async def test_a_refused_connect_is_a_plain_connect_failed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = UpstreamPool(connect_timeout=1.0, read_timeout=1.0)
    with pytest.raises(ConnectFailed) as info:
        await pool.request("GET", ("http", "127.0.0.1", port), "/", [], None)
    assert not isinstance(info.value, ConnectTimedOut)
    await pool.close()


async def _host_header_seen(host: str) -> bytes:
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if not seen.done():
            seen.set_result(head)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, host, 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_timeout=1.0, read_timeout=5.0)
    try:
        resp = await pool.request("GET", ("http", host, port), "/x", [], None)
        assert resp.status == 204
        resp.release()
        head = await seen
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    line = next(x for x in head.split(b"\r\n") if x.lower().startswith(b"host:"))
    return line.split(b":", 1)[1].strip().replace(str(port).encode(), b"PORT")


async def test_the_host_header_names_the_origin() -> None:
    assert await _host_header_seen("127.0.0.1") == b"127.0.0.1:PORT"


async def test_an_ipv6_literal_is_bracketed_in_the_host_header() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert await _host_header_seen("::1") == b"[::1]:PORT"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA:\tb \t\r\nB:\r\nC:  x:y  \r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nD: 1\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n\r\nHTTP/1.1 200 OK\r\nE: 2\r\n\r\n",
    ],
)
def test_headers_split_from_the_bytes_match_the_parser(head: bytes) -> None:
    """The head split from the bytes (no callback per header) equals httptools' own view."""
    import httptools

    from coordinator.upstream import _final_head, header_pairs

    class Collect:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_message_begin(self) -> None:
            self.headers = []  # only the last (final) head's headers count

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    seen = Collect()
    httptools.HttpResponseParser(seen).feed_data(head)
    assert header_pairs(_final_head(head)) == seen.headers
