"""A minimal blocking HTTP/1.1 keep-alive client, for latency figures without client overhead.

It records when the response headers, the first body bytes, and each chunk of a chunked body
arrived (``time.perf_counter_ns``), which is what the latency and streaming checks compare.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_ns: int
    headers_ns: int
    first_body_ns: int | None
    done_ns: int
    chunk_ns: list[int] = field(default_factory=list)  # arrival of each chunk of a chunked body
    chunks: list[bytes] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return (self.done_ns - self.sent_ns) / 1000.0

    @property
    def first_chunk_us(self) -> float | None:
        if self.first_body_ns is None:
            return None
        return (self.first_body_ns - self.sent_ns) / 1000.0


class HttpError(RuntimeError):
    pass


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.last_recv_ns = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        self.last_recv_ns = time.perf_counter_ns()
        if not data:
            raise HttpError("connection closed by the server")
        self.buf += data

    def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        sent = time.perf_counter_ns()
        self.sock.sendall(raw)
        status_line = self._read_line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        while True:
            line = self._read_line()
            if not line:
                break
            key, _, value = line.decode("latin-1").partition(":")
            hdrs[key.strip().lower()] = value.strip()
        headers_ns = self.last_recv_ns
        first_body: int | None = None
        chunks: list[int] = []
        body_parts: list[bytes] = []
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            while True:
                size_line = self._read_line()
                try:
                    size = int(size_line.split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpError(f"malformed chunked body: {size_line[:80]!r}") from None
                if size == 0:
                    while self._read_line():  # trailers, then the blank line
                        pass
                    break
                data = self._read_exact(size)
                self._read_exact(2)
                chunks.append(self.last_recv_ns)
                if first_body is None:
                    first_body = self.last_recv_ns
                body_parts.append(data)
        elif "content-length" in hdrs:
            length = int(hdrs["content-length"])
            if length and method != "HEAD":
                body_parts.append(self._read_exact(length))
                first_body = self.last_recv_ns
        else:
            raise HttpError("responses without a length or chunking are not supported")
        done = time.perf_counter_ns()
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return Response(
            status=status,
            headers=hdrs,
            body=b"".join(body_parts),
            sent_ns=sent,
            headers_ns=headers_ns,
            first_body_ns=first_body,
            done_ns=done,
            chunk_ns=chunks,
            chunks=body_parts if chunks else [],
        )
