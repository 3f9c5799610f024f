"""The coordinator's front door: ``/service/...``, heartbeats and registrations without aiohttp.

aiohttp's request handling (request objects, routing, middlewares, response objects) costs
about as much CPU per request as nginx spends proxying one, so no handler running inside it can
proxy at half of nginx's rate. This module puts a small ``asyncio.Protocol`` on the
coordinator's port. For each request it looks at the request line: a ``/service/...`` request
is parsed with ``httptools`` and proxied here (same scheduling, header policy, retries, errors,
metrics and streaming as :mod:`coordinator.proxy`). The two control-plane requests that come in
volume, ``POST /api/worker/heartbeat`` (every worker, every interval) and ``POST
/api/worker/register`` (thousands at once after a coordinator restart, through pooled
keep-alive connections), are answered here too (with or without a query string, as aiohttp
routes them), by the same :meth:`Coordinator.answer_heartbeat` and
:meth:`Coordinator.answer_register` the aiohttp routes use, after reading the body as
``read_capped`` does (413 past ``MAX_CONTROL_BODY``, never buffered beyond it; 408 past
``CLIENT_READ_TIMEOUT``; ``Expect: 100-continue`` answered when the body is wanted); a
registration's ``coordinator_url`` comes from the same :func:`coordinator.urls.public_url`.
Any other request (other methods on those paths included) hands the connection, with the
bytes already read, to aiohttp's own protocol.

The hot path: a request without a body, to a worker with an idle pooled connection, is
answered without a task, a future or an extra turn of the event loop. The request head is
written from the parser's ``on_message_complete``; the pooled connection
(:mod:`coordinator.upstream`) calls back from its ``data_received`` once the response head is
parsed, and a small complete response is relayed from there, in one write. Everything per
request is kept small: targets of catalog services are remembered, request headers are read
in one pass, a worker's Host and gateway-key lines are made once, relayed response header
sets are remembered by their bytes, and scheduling moves a slot between kept buckets. Every
other case (a body, a streamed or large response, no idle connection, a retry) is served by a
task with the same policy.

Limits of the hand-off: aiohttp keeps a connection it is given, so the front door adds
``Connection: close`` to the handed-over request (when its request line is in the bytes read):
aiohttp answers that one request, says ``Connection: close`` and closes, and the client's next
request arrives on a new connection that starts here again. Dispatch is thus per request, as a
pooled keep-alive client such as cloudflared mixes proxied and control-plane requests on its
connections. Two cases stay with aiohttp for the rest of the connection (served with the same
behaviour, only slower): an HTTP/1.0 request that asks for keep-alive (the C parser lets its
"keep-alive" win over the added "close"), and a request line that was not complete when the
hand-off decision was made. A client that *pipelines* a non-front-door request right behind
one of ours in the same packet gets our answers and then a closed connection (HTTP/1.1 allows
a server to close; pipelining clients retry what was not answered); one pipelined in a later
packet is handed over once our answers are out, and is then answered with ``Connection:
close``, closing the connection, so requests pipelined behind it in the same packet are not
answered either.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import unquote

import httptools
import structlog
from aiohttp import web
from aiohttp.web_server import Server

from coordinator.errors import HOP, error_body
from coordinator.headers import HOP_BY_HOP, REPLACED_RESPONSE, REQUEST_ID_RE
from coordinator.protocol import GATEWAY_KEY_HEADER, INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER
from coordinator.proxy import (
    _BODY_METHODS,
    _REPLACED_REQUEST,
    _SMALL_BODY,
    sniff_model,
)
from coordinator.upstream import (
    ConnectFailed,
    Disconnected,
    ResponseTimeout,
    UpstreamError,
    UpstreamResponse,
    header_pairs,
    host_header,
)
from coordinator.urls import public_url, request_host

if TYPE_CHECKING:
    from coordinator.app import Coordinator
    from coordinator.registry import WorkerRecord
    from coordinator.scheduler import Pool, Slot
    from coordinator.upstream import UpstreamPool, _Connection

log = structlog.get_logger("coordinator.proxy")

_SERVICE = b"/service/"
# Control-plane paths served here: POST only, with or without a query (as aiohttp routes them).
_HEARTBEAT = b"/api/worker/heartbeat"
_REGISTER = b"/api/worker/register"
_CONTROL_PATHS = (_HEARTBEAT, _REGISTER)
_PATH_END = (b" ", b"?")
#: Request line starts that are ours for certain (route_of decides every other start).
_OUR_LINES = tuple(
    m + b" " + _SERVICE for m in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS")
) + tuple(b"POST " + path + end for path in _CONTROL_PATHS for end in _PATH_END)
_CLOSE = b"Connection: close\r\n"
_MAX_LINE = 8190  # aiohttp's default request-line limit
_MAX_FIELD = 16_384  # the app's max_field_size
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 128
_BODY_BUFFER = 256 * 1024  # request body bytes buffered before reading from the client pauses
_KEEPALIVE = 75.0  # aiohttp's default keep-alive timeout
_HOP_B = frozenset(h.encode() for h in HOP_BY_HOP)
_REPLACED_RESPONSE_B = frozenset(h.encode() for h in REPLACED_RESPONSE)
_REPLACED_REQUEST_B = frozenset(h.encode() for h in _REPLACED_REQUEST)
_DROPPED_REQUEST = _HOP_B | _REPLACED_REQUEST_B
#: Request headers whose values the front door notes while reading the head.
_NOTED_REQUEST = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"expect",
        b"connection",
        b"x-request-id",
        b"host",
        b"cf-connecting-ip",
        b"cf-ray",
    }
)
_INTERNAL_B = INTERNAL_HEADER_PREFIX.encode()
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_REQUEST_ID_B = REQUEST_ID_HEADER.encode()
#: The request headers the proxy sets itself (clients' copies are dropped), and as lines.
_FORWARDED = (b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host", _REQUEST_ID_B)
_FORWARDED_LINES = b"".join(name + b": %s\r\n" for name in _FORWARDED)
_GATEWAY_KEY_B = GATEWAY_KEY_HEADER.encode()
_NO_BODY_STATUS = frozenset({204, 304})


#: A control-plane answer from the read body: status, JSON body, extra headers.
_ControlAnswer = Callable[["FrontProtocol", "_Request", bytes], tuple[int, bytes, dict[str, str]]]

_STATUS_LINES: dict[int, bytes] = {}
_RELAYED: dict[bytes, _Relayed] = {}
_RELAYED_MAX = 512  # distinct response header sets remembered (a Date changes once a second)


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


class _Relayed(NamedTuple):
    """A worker's response header set as relayed, with what the relay needs to know of it."""

    lines: bytes  # hop-by-hop and replaced headers dropped
    content_length: int | None
    event_stream: bool  # Content-Type: text/event-stream (never answered from a buffer)


def _relayed_headers(block: bytes) -> _Relayed:
    """A worker's response headers (the head's header lines) as relayed: hop-by-hop and
    replaced ones dropped.

    Workers repeat the same few header sets, so the result is remembered per set.
    """
    out = _RELAYED.get(block)
    if out is not None:
        return out
    raw = header_pairs(block)
    drop = _HOP_B
    length: int | None = None
    event_stream = False
    for name, value in raw:
        lower = name.lower()
        if lower == b"connection":
            drop = drop.union(t.strip().lower() for t in value.split(b","))
        elif lower == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif lower == b"content-type":
            event_stream = value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    lines = []
    for name, value in raw:
        lower = name.lower()
        if lower in drop or lower in _REPLACED_RESPONSE_B or lower.startswith(_INTERNAL_B):
            continue
        lines.append(b"%b: %b\r\n" % (name, value))
    out = _Relayed(b"".join(lines), length, event_stream)
    if len(out.lines) <= 4096:  # only small header sets are remembered
        if len(_RELAYED) >= _RELAYED_MAX:
            _RELAYED.clear()
        _RELAYED[block] = out
    return out


class _RequestIds:
    """Random 32-hex-digit request ids, drawn from ``os.urandom`` in batches."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0

    def next(self) -> str:
        pos = self.pos
        if pos >= len(self.buf):
            self.buf = os.urandom(16 * 256).hex()
            pos = 0
        self.pos = pos + 32
        return self.buf[pos : pos + 32]


_request_ids = _RequestIds()

_ROUTES_MAX = 4096  # targets remembered per front door (FrontServer.routes)
_ROUTE_MAX_TARGET = 512  # longer targets (long query strings) are not remembered


def _str_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _worker_head(worker: WorkerRecord) -> bytes:
    """The request header lines every request to ``worker`` carries: Host, its gateway key."""
    head = b"Host: %s\r\n" % host_header(worker.origin).encode("latin-1")
    if worker.gateway_key:
        head += b"%s: %s\r\n" % (_GATEWAY_KEY_B, worker.gateway_key.encode("latin-1"))
    return head


def route_of(head: bytes) -> bool | None:
    """Whether the front door serves a request starting with ``head`` (None: need more bytes).

    It serves ``/service/...`` (any method), ``POST /api/worker/heartbeat`` and
    ``POST /api/worker/register``.
    """
    head = head.lstrip(b"\r\n")
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    space = line.find(b" ")
    if space < 0:
        return None if end < 0 and len(line) < 16 else False
    target = line[space + 1 : space + 1 + len(_SERVICE)]
    if target == _SERVICE:
        return True
    if len(target) < len(_SERVICE) and end < 0 and _SERVICE.startswith(target):
        return None
    if line[:space] != b"POST":
        return False
    more = False
    for path, _ in _CONTROL:
        target = line[space + 1 : space + 2 + len(path)]  # the path and the byte after it
        if len(target) > len(path):
            if target[-1:] in _PATH_END and target.startswith(path):
                return True
        elif end < 0 and path.startswith(target):
            more = True
    return None if more else False


def _control_of(method: bytes, target: bytes) -> _ControlAnswer | None:
    """The answer of a control-plane request served here, or None for any other request."""
    if method != b"POST":
        return None
    return _CONTROL_BY_PATH.get(target.partition(b"?")[0])


def _may_be_control(url: bytes) -> bool:
    """Whether ``url``, perhaps the start of a request target, may be a control-plane path."""
    if url.startswith(_CONTROL_PATHS):
        return True
    return any(path.startswith(url) for path in _CONTROL_PATHS)


def _close_after_one(data: bytes) -> bytes:
    """``data`` with ``Connection: close`` added to its first request, if its request line is there.

    aiohttp then closes the connection after answering that request, so the client's next one
    opens a new connection, which starts at the front door. Both of aiohttp's parsers treat
    "close" as winning over a "keep-alive" also sent, for HTTP/1.1; for HTTP/1.0, llhttp (the C
    parser) lets a "keep-alive" win, so such a connection stays with aiohttp as before.
    """
    start = len(data) - len(data.lstrip(b"\r\n"))
    end = data.find(b"\r\n", start)
    if end < 0:
        return data
    end += 2
    return data[:end] + _CLOSE + data[end:]


class _Divert(Exception):
    """A pipelined request that is not ours: stop parsing this connection."""


class _HeadTooLarge(Exception):
    pass


class _Request:
    """One parsed request head and its streamed body.

    Attributes most requests leave as they are have class-level defaults (no ``__slots__``):
    a request is made per proxied request, and setting a score of fields costs more than
    its instance dict does.
    """

    buffered = 0  # body bytes buffered, not yet taken
    consumed = 0  # body bytes taken
    done = False  # the whole message was read
    discard = False  # body bytes arriving from now on are dropped
    waiter: asyncio.Future[None] | None = None
    content_length: int | None = None
    chunked = False
    content_type = ""
    expect = False  # Expect: 100-continue, not yet answered
    control: _ControlAnswer | None = None  # a control-plane request's answer
    fast = False  # answered from callbacks once the message is complete
    limit: int | None = None  # body bytes accepted; past it, `over` and the rest dropped
    over = False
    request_id: str | None = None  # X-Request-Id as presented (checked before use)
    host: bytes | None = None
    client_ip: bytes | None = None  # the first CF-Connecting-IP, from a trusted peer only
    via_cloudflare = False  # CF-Ray from a trusted peer: the client spoke HTTPS to the edge

    def __init__(
        self,
        owner: FrontProtocol,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self.owner = owner
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.http11 = http11
        self.body: collections.deque[bytes] = collections.deque()
        # One pass over the headers: what the request says of itself, and the headers
        # forwarded to the worker (hop-by-hop, replaced and internal ones dropped).
        forward: list[tuple[bytes, bytes]] = []
        self.forward = forward
        connection: list[bytes] = []
        for name, value in headers:
            lower = name.lower()
            if lower in _NOTED_REQUEST:  # the most frequent first
                if lower == b"host":
                    if self.host is None:
                        self.host = value
                elif lower == b"content-type":
                    self.content_type = value.split(b";", 1)[0].strip().decode("latin-1").lower()
                elif lower == b"content-length":
                    try:
                        self.content_length = int(value)
                    except ValueError:
                        self.content_length = None
                elif lower == b"x-request-id":
                    self.request_id = value.decode("latin-1")
                elif lower == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
                elif lower == b"expect":
                    self.expect = value.strip().lower() == b"100-continue"
                elif lower == b"connection":
                    connection.extend(t.strip().lower() for t in value.split(b","))
                elif owner.trusts_cloudflare:  # cf-connecting-ip or cf-ray
                    if lower == b"cf-ray":
                        self.via_cloudflare = True
                    elif self.client_ip is None:  # the first, as aiohttp's headers.get()
                        self.client_ip = value
                else:
                    continue  # forged by an untrusted peer: neither believed nor passed on
            if lower in _DROPPED_REQUEST or lower.startswith(_INTERNAL_B):
                continue
            forward.append((name, value))
        if connection and not _HOP_B.issuperset(connection):
            named = frozenset(connection)  # headers the client's Connection names are hop-by-hop
            self.forward = [kv for kv in forward if kv[0].lower() not in named]

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes, encoding: str = "latin-1") -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode(encoding, "surrogateescape")
        return None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes | None:
        """Buffered body bytes, ``b""`` when none yet, ``None`` at the end of the body."""
        if self.body:
            data = b"".join(self.body) if len(self.body) > 1 else self.body[0]
            self.body.clear()
            self.buffered = 0
            self.consumed += len(data)
            self.owner.body_drained()
            return data
        if self.done:
            return None
        if self.owner.lost:
            raise ConnectionResetError("the client went away")
        return b""

    async def wait(self) -> None:
        self.waiter = self.owner.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def chunks(self) -> Any:
        while True:
            data = self.take()
            if data is None:
                return
            if data:
                yield data
            else:
                await self.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


class _Exchange:
    """A request proxied from callbacks: the held slot and the pooled connection in use."""

    __slots__ = (
        "conn",
        "deadline",
        "path",
        "pool",
        "req",
        "request_id",
        "service",
        "slot",
        "started",
        "upstream_pool",
    )

    def __init__(
        self,
        req: _Request,
        slot: Slot,
        conn: _Connection,
        upstream_pool: UpstreamPool,
        service: str,
        pool: Pool,
        path: str,
        request_id: str,
        started: float,
    ) -> None:
        self.req = req
        self.slot = slot
        self.conn = conn
        self.upstream_pool = upstream_pool
        self.service = service
        self.pool = pool
        self.path = path
        self.request_id = request_id
        self.started = started  # time.monotonic() when the request was sent
        self.deadline = started + upstream_pool.read_timeout  # for the response head


#: Marks a request to be served from callbacks once its message is complete (never used as
#: an exchange: it has no attributes).
_PENDING: _Exchange = _Exchange.__new__(_Exchange)


class FrontServer:
    """Protocol factory on the coordinator's port; wraps aiohttp's ``Server`` (the fallback)."""

    def __init__(self, inner: Server, coordinator: Coordinator) -> None:
        self.inner = inner
        self.coordinator = coordinator
        self.loop = asyncio.get_running_loop()
        self.connections: set[FrontProtocol] = set()
        self.served = 0  # requests answered by the front door (tests and benches read it)
        # Request target -> (service, upstream path), for targets of this coordinator's
        # catalog services (its catalog does not change while it runs).
        self.routes: dict[bytes, tuple[str, str]] = {}
        self.sweeper: asyncio.TimerHandle | None = None

    def watch(self, timeout: float) -> None:
        """Check the deadlines of exchanges driven by callbacks periodically, not with a timer each.

        A response head that is late is noticed within ``timeout / 4`` (at most a second) of its
        deadline; the sweep costs O(connections) and runs only while exchanges are in flight.
        """
        period = min(1.0, max(0.01, timeout / 4))
        self.sweeper = self.loop.call_later(period, self._sweep, timeout)

    def _sweep(self, timeout: float) -> None:
        self.sweeper = None
        now = time.monotonic()  # exchanges' deadlines are on this clock
        waiting = False
        for conn in list(self.connections):
            ex = conn.fast
            if ex is None or ex is _PENDING:
                continue
            if ex.deadline <= now:
                ex.conn.time_out("no response")
            else:
                waiting = True
        if waiting:
            self.watch(timeout)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    # The parts of aiohttp's Server interface that runners and sites use.
    @property
    def requests_count(self) -> int:
        return self.inner.requests_count

    def pre_shutdown(self) -> None:
        self.inner.pre_shutdown()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (Server API)
        await self.inner.shutdown(timeout)
        deadline = self.loop.time() + (timeout if timeout is not None else 60.0)
        # Exchanges driven by callbacks have no task to wait for; shutdown is rare.
        while any(c.fast is not None for c in self.connections):
            if self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - self.loop.time()))
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            if conn.fast is not None:
                conn._abandon(conn.fast)
            conn.close()
        self.connections.clear()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None


class FrontProtocol(asyncio.Protocol):
    """One client connection until it is handed to aiohttp (if ever)."""

    #: Whether the peer is in TRUSTED_PROXIES: its CF-Connecting-IP and CF-Ray are believed.
    trusts_cloudflare = False

    def __init__(self, front: FrontServer) -> None:
        self.front = front
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = b""  # bytes at a request boundary, before the routing decision
        self.handoff_pending: bytes | None = None
        self.in_message = False
        self.parsing: _Request | None = None
        self.queue: collections.deque[_Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.fast: _Exchange | None = None  # a request answered from callbacks, without a task
        self.lost = False
        self.close_after = False
        self.reading_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.can_write = True
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # None while a request is being read or answered
        self.peer = ""
        self.peer_b = b""
        self.local_b = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0

    @property
    def busy(self) -> bool:
        """Whether an answer is in progress (a task, or an exchange driven by callbacks)."""
        return self.task is not None or self.fast is not None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.front.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.peer_b = self.peer.encode("latin-1")
        self.trusts_cloudflare = self.front.coordinator.proxy.trusted_proxies.trusts(self.peer)
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local_b = f"{sock[0]}:{sock[1]}".encode("latin-1")
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.front.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.fast is not None:
            self._abandon(self.fast)
        for req in (self.parsing, *self.queue):
            if req is not None:
                req.wake()
        self.can_write = True
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.handoff_pending is not None:
            self.handoff_pending += data
            return
        if self.close_after:
            return
        if self.in_message:
            self.idle_since = None
            self._feed(data)
            return
        buf = self.pending + data if self.pending else data
        ours = True if buf.startswith(_OUR_LINES) else route_of(buf)
        if ours is None:
            if len(buf) <= _MAX_LINE:
                # Not busy yet: a connection that never completes its request line still
                # closes when the idle timer fires.
                self.pending = buf
                return
            ours = False  # aiohttp answers an over-long request line
        self.idle_since = None
        self.pending = b""
        if ours:
            self._feed(buf)
        elif not self.busy:
            self.handoff(buf)
        else:  # a pipelined request for aiohttp: hand over once our answers are out
            self.handoff_pending = buf
            self._pause_reading()

    # ---------------------------------------------------------------- parsing

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade requests are proxied as plain requests (Upgrade is hop-by-hop); what
            # follows on the connection is another protocol, so it closes after the answer.
            req = self.parsing
            self.parsing = None
            self.in_message = False
            self._stop_reading()
            if req is not None:
                req.done = True
                req.wake()
                if req.fast:
                    self._fast_start(req)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, "headers_too_large", "the request head is too large")
            else:  # _Divert: serve what is queued, then close
                self._stop_reading()
        except httptools.HttpParserError as exc:
            self._refuse(400, "bad_request", f"invalid HTTP request: {exc}")

    def _stop_reading(self) -> None:
        self.close_after = True
        self._pause_reading()
        if not self.busy and self.transport is not None:
            self.transport.close()

    def _refuse(self, status: int, code: str, detail: str) -> None:
        self.close_after = True
        self._pause_reading()
        if not self.busy:
            self._write(_json_response(status, {"error": code, "detail": detail}, close=True))
            self.close()
        # else: the answer in progress finishes, then the connection closes

    def on_message_begin(self) -> None:
        self.in_message = True
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_LINE:
            raise _HeadTooLarge
        url = self._url
        if len(url) >= len(_SERVICE) and not url.startswith(_SERVICE) and not _may_be_control(url):
            raise _Divert

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if (
            len(value) > _MAX_FIELD
            or self._head_size > _MAX_HEAD
            or len(self._headers) >= _MAX_HEADERS
        ):
            raise _HeadTooLarge
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        control = None
        if not self._url.startswith(_SERVICE):
            control = _control_of(method, self._url)
            if control is None:
                raise _Divert
        req = _Request(
            self,
            method.decode("ascii", "replace"),
            self._url,
            self._headers,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.1",
        )
        if control is not None:
            req.control = control
            req.limit = self.front.coordinator.settings.max_control_body
        self.parsing = req
        if self.task is not None or self.fast is not None:  # busy
            self.queue.append(req)
        elif control is None and not req.chunked and not req.content_length:  # no body
            req.fast = True  # answered from callbacks once the message is complete
            self.fast = _PENDING
        else:
            self.task = self.loop.create_task(self._serve(req))

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or req.discard:
            return
        if req.limit is not None and req.consumed + req.buffered + len(body) > req.limit:
            req.over = True  # never buffered past the cap; the answer is 413
            req.discard = True
            req.body.clear()
            req.buffered = 0
            req.wake()
            return
        req.body.append(body)
        req.buffered += len(body)
        if req.buffered > _BODY_BUFFER:
            self._pause_reading()
        req.wake()

    def on_message_complete(self) -> None:
        req = self.parsing
        self.parsing = None
        self.in_message = False
        if req is not None:
            req.done = True
            if req.waiter is not None:
                req.wake()
            if req.fast:
                self._fast_start(req)

    # ---------------------------------------------------------------- flow control

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()

    def body_drained(self) -> None:
        if not self.close_after and self.handoff_pending is None:
            self._resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def _drain(self) -> None:
        if self.can_write or self.lost:
            return
        self.write_waiter = self.loop.create_future()
        try:
            await self.write_waiter
        finally:
            self.write_waiter = None
        if self.lost:
            raise ConnectionResetError("the client went away")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _idle(self) -> None:
        # One timer per connection, re-armed only when it fires: no timer work per request.
        self.idle_since = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(_KEEPALIVE, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.lost:
            return
        if self.idle_since is None:  # busy: look again later
            self.idle_timer = self.loop.call_later(_KEEPALIVE, self._idle_check)
            return
        left = self.idle_since + _KEEPALIVE - self.loop.time()
        if left <= 0:
            self.close()
        else:
            self.idle_timer = self.loop.call_later(left, self._idle_check)

    # ---------------------------------------------------------------- hand-off

    def handoff(self, data: bytes) -> None:
        """Give the connection, and ``data`` (read but not parsed), to aiohttp's protocol."""
        transport = self.transport
        assert transport is not None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.front.connections.discard(self)
        protocol = self.front.inner()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        if not self.can_write:
            protocol.pause_writing()
        if data:
            protocol.data_received(_close_after_one(data))

    # ---------------------------------------------------------------- serving

    async def _serve(
        self, req: _Request, first: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        while True:
            try:
                if first is not None:
                    await first()
                    first = None
                else:
                    await self._answer(req)
            except (asyncio.CancelledError, ConnectionResetError):
                self.task = None
                self.close()
                return
            except Exception:
                self.task = None
                self._crashed(req)
                return
            self.task = None
            nxt = self._answered(req)
            if nxt is None:
                return
            self.task = asyncio.current_task()  # still this task: serve the queued one
            req = nxt

    def _crashed(self, req: _Request) -> None:
        log.exception("internal_error", path=req.target.decode("latin-1"))
        self._write(
            _json_response(
                500,
                {"error": "internal_error", "detail": "the coordinator failed; a bug"},
                close=True,
            )
        )
        self.close()

    def _answered(self, req: _Request) -> _Request | None:
        """After an answer (no task or exchange running): the queued request to serve next."""
        self.front.served += 1
        if not req.done:
            # The answer did not need the rest of the body: stop here rather than read it.
            req.discard = True
            self.close_after = True
        if not req.keep_alive or self.close_after or self.lost:
            self.close()
            return None
        if self.queue:
            return self.queue.popleft()
        pending, self.handoff_pending = self.handoff_pending, None
        if pending is not None:
            self.handoff(pending)
            return None
        if self.reading_paused:
            self._resume_reading()
        self._idle()
        return None

    def _check(self, req: _Request) -> tuple[str, str] | None:
        """``(service, upstream path)`` of a proxied request, or None once an error is answered.

        Targets of catalog services are remembered (the catalog does not change at run time):
        a repeated target costs one dict lookup.
        """
        coord = self.front.coordinator
        route = self.front.routes.get(req.target)
        if route is None:
            route = self._route(req)
            if route is None:
                return None
        if coord.proxy.in_flight >= coord.settings.max_inflight:
            self._unavailable(req, "overloaded", "the coordinator is at its concurrency limit")
            return None
        return route

    def _route(self, req: _Request) -> tuple[str, str] | None:
        registry = self.front.coordinator.registry
        target = req.target.decode("latin-1")
        raw_path, _, query = target.partition("?")
        name, slash, rest = raw_path[len("/service/") :].partition("/")
        tail = slash + rest
        if "%" in name:
            name = unquote(name)
        service = registry.resolve(name)
        if not name or not registry.known_service(service):
            self._error(
                req,
                404,
                "unknown_service",
                f"no service named {name!r}",
                available=registry.service_names(),
            )
            return None
        if ("." in tail or "%" in tail) and any(
            seg in (".", "..") for seg in unquote(tail).split("/")
        ):
            self._error(req, 400, "invalid_path", "dot segments are not allowed")
            return None
        route = service, f"/service/{service}{tail or '/'}" + (f"?{query}" if query else "")
        if service in registry.catalog and len(req.target) <= _ROUTE_MAX_TARGET:
            routes = self.front.routes
            if len(routes) >= _ROUTES_MAX:
                routes.clear()
            routes[req.target] = route
        return route

    def _plan(self, req: _Request, service: str, model: str | None) -> tuple[Pool, str] | None:
        """``(pool, request_id)``, or None once an error is answered."""
        registry = self.front.coordinator.registry
        pool = registry.pool(service, model)
        if pool is None and model is not None and registry.models(service):
            self._error(
                req,
                404,
                "model_not_available",
                f"no worker of {service!r} serves model {model!r}",
                available=registry.models(service),
            )
            return None
        if pool is None or pool.size == 0:
            self._unavailable(req, "no_ready_workers", f"no worker is ready for {service!r}")
            return None
        presented = req.request_id
        request_id = (
            presented
            if presented is not None and REQUEST_ID_RE.match(presented)
            else _request_ids.next()
        )
        return pool, request_id

    async def _answer(self, req: _Request) -> None:
        if req.control is not None:
            await self._control(req, req.control)
            return
        checked = self._check(req)
        if checked is None:
            return
        service, path = checked
        settings = self.front.coordinator.settings
        body: bytes | None = None
        model: str | None = None
        length = req.content_length
        if (
            req.method in _BODY_METHODS
            and length is not None
            and 0 < length <= settings.max_model_sniff_body
            and req.content_type == "application/json"
        ):
            self._continue(req)
            body = await req.read()
            model = sniff_model(body)
        plan = self._plan(req, service, model)
        if plan is None:
            return
        pool, request_id = plan
        headers = self._request_headers(req, request_id)
        await self._attempts(req, service, pool, path, headers, body, request_id)

    async def _attempts(
        self,
        req: _Request,
        service: str,
        pool: Pool,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        request_id: str,
    ) -> None:
        registry = self.front.coordinator.registry
        settings = self.front.coordinator.settings
        exclude: frozenset[str] = frozenset()
        last_failed: WorkerRecord | None = None
        for attempt in range(1 + settings.proxy_retries):
            slot = pool.pick(registry.rng, exclude)
            if slot is None:
                break
            worker = slot.worker
            try:
                await self._forward(req, slot, service, path, headers, body, request_id)
                return
            except _Unreachable as exc:
                registry.strike(worker)
                log.warning(
                    "worker_unreachable",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    attempt=attempt + 1,
                    reason=str(exc),
                )
                last_failed = worker
                if body is None and req.has_body and req.consumed:
                    break  # part of a streamed body is gone: it cannot be sent again
                exclude = exclude | {worker.worker_id}
        if last_failed is not None:
            self._error(
                req,
                502,
                "worker_unreachable",
                "the worker could not be reached",
                worker_id=last_failed.worker_id,
                request_id=request_id,
            )
            return
        self._unavailable(req, "all_workers_busy", f"every {service!r} worker is busy")

    # ---------------------------------------------------------------- the callback-driven path

    def _spawn(self, req: _Request, first: Callable[[], Awaitable[None]] | None = None) -> None:
        self.task = self.loop.create_task(self._serve(req, first))

    def _fast_start(self, req: _Request) -> None:
        """Serve a complete request without a body, without a task while all goes well.

        With an idle pooled connection to the picked worker, the request head is written here
        and the answer is written from the callback of the response head (a small response
        complete by then is answered at once; any other gets a task that streams it). Every
        other case (no idle connection, a pooled connection the worker had closed) is served
        by the task path, :meth:`_attempts`, as requests with a body are.
        """
        req.fast = False
        self.fast = None
        if self.lost:
            return
        try:
            self._fast_begin(req)
        except Exception:
            if self.fast is not None:
                self._abandon(self.fast)
            self._crashed(req)

    def _fast_begin(self, req: _Request) -> None:
        checked = self._check(req)
        if checked is None:
            self._after_fast(req)
            return
        service, path = checked
        plan = self._plan(req, service, None)
        if plan is None:
            self._after_fast(req)
            return
        pool, request_id = plan
        coord = self.front.coordinator
        upstream_pool = coord.proxy._pool
        slot = pool.pick(coord.registry.rng)
        conn = None
        now = time.monotonic()
        if slot is not None and upstream_pool is not None:
            conn = upstream_pool.take_idle(slot.worker.origin, now)
        if slot is None or conn is None or conn.transport is None:
            self._spawn(
                req,
                partial(
                    self._attempts,
                    req,
                    service,
                    pool,
                    path,
                    self._request_headers(req, request_id),
                    None,
                    request_id,
                ),
            )
            return
        assert upstream_pool is not None
        worker = slot.worker
        method = req.method
        worker_head = worker.proxy_head
        if worker_head is None:
            worker_head = worker.proxy_head = _worker_head(worker)
        forward = req.forward
        head = b"%s %s HTTP/1.1\r\n%s%s%s%s\r\n" % (
            method.encode(),
            path.encode(),
            worker_head,
            b"".join([b"%s: %s\r\n" % kv for kv in forward]) if forward else b"",
            _FORWARDED_LINES % self._forwarded(req, request_id),
            b"Content-Length: 0\r\n" if method in _BODY_METHODS else b"",
        )
        coord.registry.acquire(slot)
        coord.proxy.in_flight += 1
        conn.begin(method == "HEAD", self._on_upstream_head)
        conn.transport.write(head)
        ex = _Exchange(
            req,
            slot,
            conn,
            upstream_pool,
            service,
            pool,
            path,
            request_id,
            now,
        )
        self.fast = ex
        if self.front.sweeper is None:
            self.front.watch(upstream_pool.read_timeout)

    def _on_upstream_head(self, conn: _Connection) -> None:
        """The worker's response head was parsed (often its whole response), or it failed."""
        ex = self.fast
        if ex is None or ex is _PENDING or ex.conn is not conn:
            return  # the client went away; _abandon cleaned up
        try:
            self._fast_answer(ex)
        except Exception:
            if self.fast is ex:
                self._abandon(ex)
            self._crashed(ex.req)

    def _fast_answer(self, ex: _Exchange) -> None:
        req, conn, worker = ex.req, ex.conn, ex.slot.worker
        coord = self.front.coordinator
        if not conn.head_seen:
            exc = conn.error
            if isinstance(exc, Disconnected):
                # A pooled connection the worker had closed: the task path tries again.
                self._fast_end(ex, 0)
                headers = self._request_headers(req, ex.request_id)
                self._spawn(
                    req,
                    partial(
                        self._attempts,
                        req,
                        ex.service,
                        ex.pool,
                        ex.path,
                        headers,
                        None,
                        ex.request_id,
                    ),
                )
                return
            if isinstance(exc, ResponseTimeout):
                status = 504
                self._worker_error(
                    req,
                    worker,
                    ex.request_id,
                    504,
                    "worker_timeout",
                    f"no response within {coord.settings.proxy_ttfb_timeout:g} s",
                )
            elif isinstance(exc, UpstreamError):
                status = 502
                log.warning(
                    "worker_bad_response",
                    worker_id=worker.worker_id,
                    request_id=ex.request_id,
                    error=str(exc),
                )
                self._worker_error(
                    req,
                    worker,
                    ex.request_id,
                    502,
                    "worker_bad_response",
                    "the worker's answer was not valid HTTP",
                )
            else:
                raise AssertionError(f"unexpected upstream failure: {exc!r}")
            self._fast_end(ex, status)
            self._after_fast(req)
            return
        status = conn.status
        now = time.monotonic()
        coord.metrics.observe_response(ex.service, now - ex.started)
        relayed = _relayed_headers(conn.head_block)
        if (
            conn.complete
            and relayed.content_length is not None
            and relayed.content_length <= _SMALL_BODY
            and status >= 200
            and status not in _NO_BODY_STATUS
            and req.method != "HEAD"
            and not relayed.event_stream
        ):
            payload = conn.take() or b""
            close = b"Connection: close\r\n" if not req.keep_alive or self.close_after else b""
            self._write(
                b"".join(
                    (
                        _status_line(status),
                        relayed.lines,
                        b"X-Request-Id: ",
                        ex.request_id.encode("latin-1"),
                        b"\r\nContent-Length: %d\r\n" % len(payload),
                        close,
                        b"\r\n",
                        payload,
                    )
                )
            )
            ex.upstream_pool.reuse(worker.origin, conn, now)
            self._fast_end(ex, status)
            self._after_fast(req)
            return
        upstream = UpstreamResponse(ex.upstream_pool, worker.origin, conn)
        self.fast = None  # the slot stays held until the task has relayed the body
        self._spawn(req, partial(self._fast_relay, ex, upstream))

    async def _fast_relay(self, ex: _Exchange, upstream: UpstreamResponse) -> None:
        try:
            await self._relay(ex.req, upstream, ex.slot.worker, ex.request_id)
        finally:
            self._release(ex, upstream.status)

    def _release(self, ex: _Exchange, status: int) -> None:
        coord = self.front.coordinator
        coord.proxy.in_flight -= 1
        coord.registry.release(ex.slot)
        if status:
            coord.metrics.proxied(ex.service, status)

    def _fast_end(self, ex: _Exchange, status: int) -> None:
        self.fast = None
        self._release(ex, status)

    def _abandon(self, ex: _Exchange) -> None:
        """The exchange in progress ends unanswered (the client left, or a bug)."""
        self.fast = None
        if ex is _PENDING:
            return
        if ex.conn.transport is not None:
            ex.conn.transport.close()
        self._release(ex, 0)

    def _after_fast(self, req: _Request) -> None:
        nxt = self._answered(req)
        if nxt is not None:
            self._spawn(nxt)

    async def _control(self, req: _Request, answer: _ControlAnswer) -> None:
        """A control-plane request: read the body as ``read_capped`` does, then ``answer``."""
        coord = self.front.coordinator
        limit = coord.settings.max_control_body
        limit_s = coord.settings.client_read_timeout
        if req.over or (req.content_length is not None and req.content_length > limit):
            self._reply(req, 413, error_body("body_too_large", f"at most {limit} bytes"))
            return
        self._continue(req)
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(limit_s):  # a slow body (slowloris) is cut off: 408
                while not req.over:
                    data = req.take()
                    if data is None:
                        break
                    if data:
                        parts.append(data)
                    else:
                        await req.wait()
        except TimeoutError:
            body = error_body("request_timeout", f"the body took longer than {limit_s} s")
            self._reply(req, 408, body)
            return
        if req.over:
            self._reply(req, 413, error_body("body_too_large", f"at most {limit} bytes"))
            return
        status, payload, headers = answer(self, req, b"".join(parts))
        self._reply(req, status, payload, headers)

    def coordinator_url(self, req: _Request) -> str:
        """The coordinator's URL as ``req`` shows it, as the aiohttp routes compute it."""
        transport = self.transport
        sslcontext = sockname = None
        if transport is not None:
            sslcontext = transport.get_extra_info("sslcontext")
            sockname = transport.get_extra_info("sockname")
        return public_url(
            self.front.coordinator.settings.coordinator_public_url,
            scheme="https" if sslcontext else "http",
            forwarded_proto=req.header(b"x-forwarded-proto", "utf-8"),
            host=request_host(req.header(b"host", "utf-8"), sockname),
        )

    def _reply(
        self, req: _Request, status: int, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        close = not req.keep_alive or self.close_after or not req.done
        self._write(_response(status, payload, headers=headers, close=close))

    def _continue(self, req: _Request) -> None:
        if req.expect and req.http11:
            req.expect = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _forwarded(self, req: _Request, request_id: str) -> tuple[bytes, bytes, bytes, bytes]:
        """The values of the headers the proxy sets (:data:`_FORWARDED`), in that order."""
        return (
            req.client_ip or self.peer_b,
            b"https" if req.via_cloudflare else b"http",
            req.host or self.local_b,
            request_id.encode("latin-1"),
        )

    def _request_headers(self, req: _Request, request_id: str) -> list[tuple[str, str]]:
        """The headers sent to a worker, besides Host, its gateway key and the body framing."""
        headers = [*req.forward, *zip(_FORWARDED, self._forwarded(req, request_id), strict=True)]
        return _str_headers(headers)

    async def _send(
        self,
        req: _Request,
        worker: WorkerRecord,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
    ) -> UpstreamResponse:
        pool = self.front.coordinator.proxy._pool
        assert pool is not None, "Proxy.start() was not awaited"
        if worker.gateway_key:
            headers = [*headers, (GATEWAY_KEY_HEADER, worker.gateway_key)]
        replayable = body is not None or not req.has_body
        for fresh in (False, True):
            data: Any = body
            if body is None and req.has_body:
                self._continue(req)
                data = req.chunks()
            try:
                return await pool.request(
                    req.method,
                    worker.origin,
                    path,
                    headers,
                    data,
                    body_length=req.content_length if req.has_body else None,
                    fresh=fresh,
                )
            except ConnectFailed as exc:
                raise _Unreachable(str(exc)) from exc
            except Disconnected as exc:
                if exc.reused and replayable and not fresh:
                    continue  # a pooled connection the worker had closed: once more, fresh
                if replayable:
                    raise _Unreachable(str(exc)) from exc
                raise
        raise AssertionError("unreachable")

    async def _forward(
        self,
        req: _Request,
        slot: Slot,
        service: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        request_id: str,
    ) -> None:
        coord = self.front.coordinator
        registry, metrics, proxy = coord.registry, coord.metrics, coord.proxy
        worker = slot.worker
        registry.acquire(slot)
        proxy.in_flight += 1
        started = time.perf_counter()
        status = 0
        try:
            try:
                upstream = await self._send(req, worker, path, headers, body)
            except Disconnected:
                status = 502
                self._worker_error(req, worker, request_id, 502, "worker_unreachable")
                return
            except ResponseTimeout:
                status = 504
                self._worker_error(
                    req,
                    worker,
                    request_id,
                    504,
                    "worker_timeout",
                    f"no response within {coord.settings.proxy_ttfb_timeout:g} s",
                )
                return
            except UpstreamError as exc:
                status = 502
                log.warning(
                    "worker_bad_response",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=str(exc),
                )
                self._worker_error(
                    req,
                    worker,
                    request_id,
                    502,
                    "worker_bad_response",
                    "the worker's answer was not valid HTTP",
                )
                return
            status = upstream.status
            metrics.observe_response(service, time.perf_counter() - started)
            await self._relay(req, upstream, worker, request_id)
        finally:
            proxy.in_flight -= 1
            registry.release(slot)
            if status:
                metrics.proxied(service, status)

    def _response_head(self, upstream: UpstreamResponse, request_id: str) -> list[bytes]:
        """The status line and the worker's headers as relayed, plus X-Request-Id."""
        return [
            _status_line(upstream.status),
            _relayed_headers(upstream.head_block).lines,
            b"X-Request-Id: %b\r\n" % request_id.encode("latin-1"),
        ]

    async def _relay(
        self, req: _Request, upstream: UpstreamResponse, worker: WorkerRecord, request_id: str
    ) -> None:
        lines = self._response_head(upstream, request_id)
        status = upstream.status
        keep = req.keep_alive and not self.close_after
        length = upstream.content_length
        is_stream = upstream.content_type == "text/event-stream"
        try:
            if req.method == "HEAD" or status in (204, 304) or status < 200:
                if length is not None and req.method == "HEAD":
                    lines.append(b"Content-Length: %d\r\n" % length)
                if not keep:
                    lines.append(b"Connection: close\r\n")
                lines.append(b"\r\n")
                if req.method != "HEAD":
                    await upstream.read()
                self._write(b"".join(lines))
                return
            if length is not None and length <= _SMALL_BODY and not is_stream:
                try:
                    payload = await upstream.read()
                except UpstreamError:
                    upstream.close()
                    self._worker_error(
                        req,
                        worker,
                        request_id,
                        502,
                        "worker_stream_broken",
                        "the worker's answer broke off",
                    )
                    return
                lines.append(b"Content-Length: %d\r\n" % len(payload))
                if not keep:
                    lines.append(b"Connection: close\r\n")
                lines.append(b"\r\n")
                lines.append(payload)
                self._write(b"".join(lines))
                return
            chunked = length is None and req.http11
            if length is not None:
                lines.append(b"Content-Length: %d\r\n" % length)
            elif chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False  # HTTP/1.0 without a length: the end of the body is the close
            if not keep:
                self.close_after = True
                lines.append(b"Connection: close\r\n")
            lines.append(b"\r\n")
            self._write(b"".join(lines))
            try:
                async for chunk in upstream.iter_chunks():
                    self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self._drain()
            except UpstreamError as exc:
                log.warning(
                    "stream_broken",
                    worker_id=worker.worker_id,
                    request_id=request_id,
                    error=str(exc),
                )
                if is_stream:
                    event = _sse_error(worker, request_id)
                    self._write(b"%x\r\n%b\r\n" % (len(event), event) if chunked else event)
                # Leave the message incomplete so the client sees the failure.
                self.close_after = True
                self.close()
                return
            if chunked:
                self._write(b"0\r\n\r\n")
        except BaseException:
            upstream.close()
            raise
        finally:
            upstream.release()

    # ---------------------------------------------------------------- error answers

    def _error(self, req: _Request, status: int, code: str, detail: Any, **extra: Any) -> None:
        self._json(req, status, {"error": code, "detail": detail, "hop": HOP, **extra})

    def _json(
        self,
        req: _Request,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        close = not req.keep_alive or self.close_after or not req.done
        self._write(_json_response(status, body, headers=headers, close=close))

    def _unavailable(self, req: _Request, code: str, detail: str) -> None:
        coord = self.front.coordinator
        coord.metrics.proxy_rejected(code)
        self._json(
            req,
            503,
            {"error": code, "detail": detail, "hop": HOP},
            headers={"Retry-After": str(coord.settings.retry_after)},
        )

    def _worker_error(
        self,
        req: _Request,
        worker: WorkerRecord,
        request_id: str,
        status: int,
        code: str,
        detail: str = "the worker could not be reached",
    ) -> None:
        self._error(req, status, code, detail, worker_id=worker.worker_id, request_id=request_id)


class _Unreachable(Exception):
    """The worker could not be reached before any request byte was sent."""


def _answer_heartbeat(
    conn: FrontProtocol, req: _Request, body: bytes
) -> tuple[int, bytes, dict[str, str]]:
    return conn.front.coordinator.answer_heartbeat(body, req.header(b"authorization", "utf-8"))


def _answer_register(
    conn: FrontProtocol, req: _Request, body: bytes
) -> tuple[int, bytes, dict[str, str]]:
    return conn.front.coordinator.answer_register(
        body, req.header(b"authorization", "utf-8"), conn.coordinator_url(req)
    )


#: The control-plane requests served here (POST), by path: the answer once the body is read.
_CONTROL: tuple[tuple[bytes, _ControlAnswer], ...] = (
    (_HEARTBEAT, _answer_heartbeat),
    (_REGISTER, _answer_register),
)
_CONTROL_BY_PATH = dict(_CONTROL)


def _json_response(
    status: int,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    if "hop" not in body:
        body = {**body, "hop": HOP}
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    return _response(status, payload, headers=headers, close=close)


def _response(
    status: int,
    payload: bytes,
    *,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if headers:
        head.extend(f"{k}: {v}" for k, v in headers.items())
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def _sse_error(worker: WorkerRecord, request_id: str) -> bytes:
    event = json.dumps(
        {
            "error": "worker_stream_broken",
            "hop": HOP,
            "worker_id": worker.worker_id,
            "request_id": request_id,
        }
    )
    return f"event: error\ndata: {event}\n\n".encode()


class FrontRunner(web.AppRunner):
    """An ``AppRunner`` whose sites put the front door in front of the coordinator app.

    Apps without a coordinator (``COORDINATOR`` key) are served by aiohttp alone.
    """

    async def _make_server(self) -> Server:
        inner = await super()._make_server()
        from coordinator.app import COORDINATOR

        coordinator = self.app.get(COORDINATOR)
        if coordinator is None:
            return inner
        # Sites only call the factory and the shutdown hooks, which FrontServer provides.
        return cast(Server, FrontServer(inner, coordinator))


def front_server(runner: web.BaseRunner) -> FrontServer | None:
    """The front door of a runner's server, if it has one."""
    server: object = runner.server
    return server if isinstance(server, FrontServer) else None
