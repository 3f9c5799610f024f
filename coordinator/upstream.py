"""A lean HTTP/1.1 client for the proxy hot path: pooled keep-alive connections to workers.

aiohttp's client spends most of a proxied request's time in per-request machinery (URL objects,
tracing, cookie and redirect handling) that a reverse proxy does not need. This client does
only what the proxy needs: write a request head and body, parse the response with ``httptools``
(the parser uvicorn uses), stream the body with back-pressure, and return the connection to a
per-origin pool when the response was read to the end.

Failures are typed so the proxy can decide what is safe to retry:
:class:`ConnectFailed` (nothing was sent; its subclass :class:`ConnectTimedOut` when the connect
timed out), :class:`Disconnected` (the connection closed before response headers; ``reused``
tells whether it was a pooled one), :class:`ResponseTimeout`, and :class:`BodyError` (the
response broke off after its headers).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import cast

import httptools

_MAX_BUFFER = 256 * 1024  # response bytes buffered before reading from the socket pauses
_MAX_HEAD = 64 * 1024  # response bytes accepted before the response head is complete


class UpstreamError(Exception):
    """Base class of upstream failures."""


class ConnectFailed(UpstreamError):
    """The connection could not be opened; no request byte was sent."""


class ConnectTimedOut(ConnectFailed):
    """The connection was not open within the connect timeout; no request byte was sent."""


class Disconnected(UpstreamError):
    """The connection closed before response headers arrived."""

    def __init__(self, message: str, *, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class ResponseTimeout(UpstreamError):
    """No response headers (or no body bytes) within the read timeout."""


class BodyError(UpstreamError):
    """The response body broke off."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request/response exchange at a time.

    An exchange starts with :meth:`begin`. Its caller learns that the response head arrived
    (or that the exchange failed) either from the ``headers_done`` future, or, cheaper, from a
    ``notify`` callback run synchronously from :meth:`data_received` once the bytes received
    so far are parsed (so a small response is usually complete by then) or from the failure.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.active = False  # an exchange is in progress (bytes are expected)
        self._parser: httptools.HttpResponseParser | None = None
        self._interim = False  # parsing a 1xx interim response, which is skipped
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.buffer: collections.deque[bytes] = collections.deque()
        self._reset(None)

    def _reset(self, notify: Callable[[_Connection], None] | None) -> None:
        self.status = 0
        self.head_block = b""  # the response's header lines, each ending in CRLF
        self._raw = b""  # bytes received until the response head was parsed
        self.head_seen = False
        self.notify = notify
        self.headers_done: asyncio.Future[None] | None = (
            None if notify is not None else self.loop.create_future()
        )
        self.complete = False
        self.keep_alive = False
        self.head = False
        self.buffer.clear()
        self.buffered = 0
        self.paused = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or not self.active:
            # Bytes while idle: the server is confused; drop the link.
            self._fail(Disconnected("unexpected bytes on an idle connection", reused=True))
            return
        if not self.head_seen:
            # The head is split from these bytes once parsed (on_headers_complete).
            self._raw = self._raw + data if self._raw else data
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BodyError(f"invalid HTTP response: {exc}"))
            return
        if not self.head_seen and len(self._raw) > _MAX_HEAD:
            self._fail(BodyError(f"no response head within {_MAX_HEAD} bytes"))
            return
        notify = self.notify
        if notify is not None and self.head_seen:
            self.notify = None
            notify(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        if not self.complete:
            if not self.head_seen:
                self._fail(
                    Disconnected("connection closed before the response", reused=self.reused)
                )
            else:
                self._fail(BodyError("connection closed mid-body"))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers, in order, as ``(name, value)`` byte pairs."""
        return header_pairs(self.head_block)

    # httptools callbacks (no on_header: the head is split from the bytes, see _final_head) -

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): not the answer; skip it.
            self._interim = True
            return
        self.head_block = _final_head(self._raw)  # a BodyError here fails the exchange
        self._raw = b""
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        if self.head:
            self.complete = True
            self.keep_alive = False
        self.head_seen = True
        done = self.headers_done
        if done is not None and not done.done():
            done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.buffer.append(body)
        self.buffered += len(body)
        if self.buffered > _MAX_BUFFER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if self.waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.active = False
        if self.waiter is not None:
            self._wake()

    # helpers ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.active = False
        self._parser = None  # never parse on this connection again
        done = self.headers_done
        if done is not None and not done.done():
            done.set_exception(exc)
            done.exception()  # mark retrieved; the caller re-raises it
        self._wake()
        if self.transport is not None:
            self.transport.close()
        notify = self.notify
        if notify is not None:
            self.notify = None
            notify(self)

    def time_out(self, what: str) -> None:
        self._fail(ResponseTimeout(f"{what} within the read timeout"))

    def begin(self, head: bool, notify: Callable[[_Connection], None] | None = None) -> None:
        """Start an exchange (the request is written by the caller right after).

        Without ``notify`` the caller awaits ``headers_done``; with it, ``notify(self)`` runs
        once, when the response head has been parsed or the exchange failed (``error``).
        """
        self._reset(notify)
        self.head = head
        self.active = True
        if self._parser is None:
            # One parser per connection: llhttp parses the keep-alive responses in sequence.
            self._parser = httptools.HttpResponseParser(self)

    async def drain(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()
        if self.closed:
            raise Disconnected("connection closed while sending", reused=self.reused)

    def take(self) -> bytes | None:
        """The buffered body bytes, ``b""`` when none yet, ``None`` at the end."""
        if self.buffer:
            data = b"".join(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
            self.buffer.clear()
            self.buffered = 0
            if self.paused and self.transport is not None and not self.closed:
                self.paused = False
                self.transport.resume_reading()
            return data
        if self.complete:
            return None
        if self.error is not None:
            raise self.error
        return b""


def _final_head(raw: bytes) -> bytes:
    """The header lines of the final response head at the start of ``raw``, CRLF-terminated.

    ``raw`` holds the bytes of an exchange up to (at least) the end of the final response head,
    which httptools (llhttp, strict: CRLF line ends, no obs-fold, no space before a colon) has
    accepted; interim 1xx heads before it are skipped. Splitting the head from the bytes costs
    far less than a Python callback per header.
    """
    start = 0
    while True:
        if raw.startswith(b"\r\n", start):  # blank lines between responses
            start = len(raw) - len(raw[start:].lstrip(b"\r\n"))
        line_end = raw.find(b"\r\n", start)
        end = raw.find(b"\r\n\r\n", line_end)
        if end < 0 or not raw.startswith(b"HTTP/", start):
            raise BodyError("invalid HTTP response head")
        if raw[start + 9] == 0x31 and raw[start + 9 : start + 12] != b"101":  # 1xx: interim
            start = end + 4
            continue
        return raw[line_end + 2 : end + 2]


def header_pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of CRLF-terminated header lines (values as llhttp gives them)."""
    pairs = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        pairs.append((name, value.lstrip(b" \t")))
    return pairs


class UpstreamResponse:
    """Response head plus a streamed body. Call :meth:`release` (or :meth:`close`) when done."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.head_block = conn.head_block
        self.raw_headers = conn.headers
        self.content_length: int | None = None
        self.content_type = ""
        for name, value in self.raw_headers:
            lower = name.lower()
            if lower == b"content-length":
                try:
                    self.content_length = int(value)
                except ValueError:
                    self.content_length = None
            elif lower == b"content-type":
                self.content_type = value.split(b";", 1)[0].strip().decode("latin-1").lower()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None, "response already released"
        while True:
            data = conn.take()
            if data is None:
                return
            if data:
                yield data
                continue
            conn.waiter = conn.loop.create_future()
            timer = conn.loop.call_later(self._pool.read_timeout, conn.time_out, "no body bytes")
            try:
                await conn.waiter
            finally:
                timer.cancel()
                conn.waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.reuse(self._key, conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()


def host_header(key: tuple[str, str, int]) -> str:
    """The Host header for ``key = (scheme, host, port)``: no default port, IPv6 bracketed."""
    scheme, host, port = key
    if ":" in host:  # an IPv6 literal is bracketed in Host (RFC 9110 7.2)
        host = f"[{host}]"
    return host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"


class UpstreamPool:
    """Per-origin pools of idle keep-alive connections."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
        max_idle_per_origin: int = 256,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def reuse(self, key: tuple[str, str, int], conn: _Connection, now: float | None = None) -> None:
        """After an exchange: pool ``conn`` if its response was read whole and it stays open.

        ``now`` is ``time.monotonic()`` if the caller has just read it.
        """
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._put(key, conn, time.monotonic() if now is None else now)
        elif conn.transport is not None:
            conn.transport.close()

    def _put(self, key: tuple[str, str, int], conn: _Connection, now: float) -> None:
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = collections.deque()
        if len(idle) >= self.max_idle_per_origin:
            assert conn.transport is not None
            conn.transport.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def take_idle(self, key: tuple[str, str, int], now: float | None = None) -> _Connection | None:
        """A live idle pooled connection to ``key`` (the most recently used), or ``None``.

        ``now`` is ``time.monotonic()`` if the caller has just read it.
        """
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = (time.monotonic() if now is None else now) - self.keepalive_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                conn.reused = True
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self, key: tuple[str, str, int], fresh: bool) -> _Connection:
        scheme, host, port = key
        conn = None if fresh else self.take_idle(key)
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError:
            raise ConnectTimedOut(f"connect timed out after {self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        return conn

    async def request(
        self,
        method: str,
        key: tuple[str, str, int],
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        body_length: int | None = None,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send a request to ``key = (scheme, host, port)`` and wait for the response head.

        ``headers`` must not hold Host, Content-Length or Transfer-Encoding: this method sets
        them. A streamed ``body`` of known ``body_length`` is sent with Content-Length, an
        unknown one chunked. ``fresh`` skips pooled connections.
        """
        conn = await self._connect(key, fresh)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header(key)}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        chunked = False
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            if body_length is not None:
                lines.append(f"Content-Length: {body_length}")
            else:
                chunked = True
                lines.append("Transfer-Encoding: chunked")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.begin(head=method == "HEAD")
        transport = conn.transport
        assert transport is not None
        try:
            if isinstance(body, bytes):
                transport.write(head + body)
            else:
                transport.write(head)
                if body is not None:
                    await self._send_stream(conn, body, chunked)
        except Disconnected:
            transport.close()
            raise
        timer = conn.loop.call_later(self.read_timeout, conn.time_out, "no response")
        assert conn.headers_done is not None
        try:
            await conn.headers_done
        finally:
            timer.cancel()
        return UpstreamResponse(self, key, conn)

    async def _send_stream(
        self, conn: _Connection, body: AsyncIterable[bytes], chunked: bool
    ) -> None:
        transport = conn.transport
        assert transport is not None
        async for chunk in body:
            if conn.closed or conn.head_seen or conn.error is not None:
                break  # the server answered (or left) early: stop sending
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await conn.drain()
        if chunked and not conn.closed:
            transport.write(b"0\r\n\r\n")

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                conn = idle.pop()
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)


__all__ = [
    "BodyError",
    "ConnectFailed",
    "ConnectTimedOut",
    "Disconnected",
    "ResponseTimeout",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "header_pairs",
    "host_header",
]
