"""``X-Forwarded-*`` as workers see them: ``TRUSTED_PROXIES`` decides whether Cloudflare's headers
count, and the front door and the aiohttp proxy forward the very same values.

Every test client connects from 127.0.0.1: the default setting trusts it (cloudflared on the
same host); ``10.9.9.9/32`` or an empty value make it an untrusted, directly connecting client.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pydantic import ValidationError

from coordinator.__main__ import main
from coordinator.app import COORDINATOR, create_app
from coordinator.forwarding import DEFAULT_TRUSTED_PROXIES, TrustedProxies, parse_networks
from coordinator.frontdoor import front_server
from coordinator.settings import CoordinatorSettings
from tests.conftest import Backend, BackendFactory, Fed, make_settings

#: The request headers the proxy sets itself.
_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id")

# ---------------------------------------------------------------- the setting and the check


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("172.16.0.1", True),
        ("172.18.0.3", True),  # a compose network's cloudflared
        ("172.31.255.254", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped, from a dual-stack socket
        ("::ffff:172.20.0.2", True),
        ("172.32.0.1", False),
        ("10.0.0.7", False),
        ("192.168.1.20", False),
        ("203.0.113.9", False),
        ("::2", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:10.0.0.7", False),
        ("", False),  # a Unix socket peer
        (None, False),
        ("localhost", False),
        ("not an address", False),
    ],
)
def test_default_trusts_loopback_and_docker_networks(peer: str | None, trusted: bool) -> None:
    proxies = TrustedProxies(CoordinatorSettings().trusted_proxies)
    assert proxies.trusts(peer) is trusted
    assert proxies.trusts(peer) is trusted  # remembered, same answer


def test_default_is_the_documented_one() -> None:
    assert CoordinatorSettings().trusted_proxies == parse_networks(
        DEFAULT_TRUSTED_PROXIES.split(",")
    )
    assert [str(n) for n in CoordinatorSettings().trusted_proxies] == [
        "127.0.0.0/8",
        "::1/128",
        "172.16.0.0/12",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        (" , ", []),
        ("10.9.9.9", ["10.9.9.9/32"]),
        (" 10.0.0.0/8 ,fd00::/8,2001:db8::7 ", ["10.0.0.0/8", "fd00::/8", "2001:db8::7/128"]),
        ("0.0.0.0/0,::/0", ["0.0.0.0/0", "::/0"]),
    ],
)
def test_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", value)
    assert [str(n) for n in CoordinatorSettings().trusted_proxies] == expected


def test_setting_from_python_values() -> None:
    assert CoordinatorSettings(trusted_proxies=["10.9.9.9/32"]).trusted_proxies == (
        ipaddress.ip_network("10.9.9.9/32"),
    )
    networks = (ipaddress.ip_network("fd00::/8"),)
    assert CoordinatorSettings(trusted_proxies=networks).trusted_proxies == networks
    assert CoordinatorSettings(trusted_proxies=[]).trusted_proxies == ()


def test_empty_setting_trusts_nobody() -> None:
    proxies = TrustedProxies(CoordinatorSettings(trusted_proxies="").trusted_proxies)
    assert not proxies.trusts("127.0.0.1")
    assert not proxies.trusts("::1")


def test_single_addresses_and_ipv6_networks() -> None:
    proxies = TrustedProxies(parse_networks(["10.9.9.9", "fd00::/8"]))
    assert proxies.trusts("10.9.9.9")
    assert not proxies.trusts("10.9.9.8")
    assert proxies.trusts("fd12:3456::1")
    assert not proxies.trusts("fe80::1")
    assert not proxies.trusts("127.0.0.1")


@pytest.mark.parametrize(
    "value",
    ["bogus", "10.0.0.1/8", "10.0.0.0/33", "127.0.0.1,,nope", "300.1.1.1", "fd00::/129", "*"],
)
def test_invalid_entries_fail_validation(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", value)
    with pytest.raises(ValidationError, match=r"TRUSTED_PROXIES: .* is not an IP address"):
        CoordinatorSettings()


@pytest.mark.parametrize("command", [[], ["demo"]])
def test_invalid_setting_stops_startup_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8,cloudflared")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "TRUSTED_PROXIES: 'cloudflared' is not an IP address or CIDR network" in err


# ---------------------------------------------------------------- both paths, one answer


async def _aiohttp_fed(aiohttp_client: Any, tmp_path: Path, **overrides: Any) -> Fed:
    """A coordinator served by aiohttp alone: ``/service/...`` goes through coordinator.proxy."""
    app = create_app(make_settings(tmp_path, **overrides), coordinator_id="coord-aiohttp")
    client = await aiohttp_client(TestServer(app, host="127.0.0.1"))
    return Fed(client, app[COORDINATOR])


async def _raw_request(fed: Fed, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.client.server.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return answer


def _request(extra: bytes, *, body: bytes = b"") -> bytes:
    head = b"GET /service/echo/fw?x=1 HTTP/1.1\r\n"
    if body:
        head = b"POST /service/echo/fw?x=1 HTTP/1.1\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n" % len(body)
    head += b"Host: coord.test\r\nX-Request-Id: rid-fw\r\nConnection: close\r\n"
    return head + extra + b"\r\n" + body


async def _seen(fed: Fed, backend: Backend, request: bytes) -> list[tuple[str, str]]:
    """Every request header as the worker received it, in order."""
    before = len(backend.seen)
    answer = await _raw_request(fed, request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert len(backend.seen) == before + 1
    headers = backend.seen[-1]["headers"]
    return list(headers.items())


Both = Callable[..., Awaitable[tuple[Fed, Fed, Backend]]]


@pytest.fixture
def both(
    fed_factory: Callable[..., Awaitable[Fed]],
    aiohttp_client: Any,
    tmp_path: Path,
    backend_factory: BackendFactory,
) -> Both:
    """Two coordinators with the same settings and worker: the front door's, aiohttp's."""

    async def make(**overrides: Any) -> tuple[Fed, Fed, Backend]:
        front = await fed_factory(**overrides)
        assert front_server(front.client.server.runner) is not None  # type: ignore[attr-defined]
        plain = await _aiohttp_fed(aiohttp_client, tmp_path, **overrides)
        backend = await backend_factory()
        await front.register(backend.url)
        await plain.register(backend.url)
        return front, plain, backend

    return make


async def _both_ways(
    both: Both, extra: bytes, body: bytes = b"", **overrides: Any
) -> dict[str, str]:
    front, plain, backend = await both(**overrides)
    server = front_server(front.client.server.runner)  # type: ignore[attr-defined]
    assert server is not None
    served = server.served
    via_front_door = await _seen(front, backend, _request(extra, body=body))
    assert server.served == served + 1  # the front door answered, not aiohttp behind it
    via_aiohttp = await _seen(plain, backend, _request(extra, body=body))
    assert via_front_door == via_aiohttp  # all headers: the same names, values and order
    return dict((k.lower(), v) for k, v in via_front_door if k.lower() in _FORWARDED)


_CF = b"CF-Connecting-IP: 203.0.113.9\r\nCF-Ray: 8f1e2d3c4b5a6978-LHR\r\n"
_FORGED = (
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: evil.test\r\n"
)

#: (client headers, X-Forwarded-For and -Proto from a trusted peer)
_CASES: dict[str, tuple[bytes, tuple[str, str]]] = {
    "none": (b"", ("127.0.0.1", "http")),
    "cloudflare": (_CF, ("203.0.113.9", "https")),
    "connecting_ip_only": (b"CF-Connecting-IP: 198.51.100.4\r\n", ("198.51.100.4", "http")),
    "ray_only": (b"CF-Ray: 8f1e2d3c4b5a6978-LHR\r\n", ("127.0.0.1", "https")),
    "ipv6_client": (b"cf-connecting-ip: 2001:db8::7\r\ncf-ray: x\r\n", ("2001:db8::7", "https")),
    "two_connecting_ips": (
        b"CF-Connecting-IP: 203.0.113.9\r\nCF-Connecting-IP: 198.51.100.4\r\n",
        ("203.0.113.9", "http"),
    ),
    "empty_connecting_ip": (b"CF-Connecting-IP: \r\nCF-Ray: x\r\n", ("127.0.0.1", "https")),
    "forged_forwarded": (_FORGED, ("127.0.0.1", "http")),
    "forged_forwarded_and_cloudflare": (_FORGED + _CF, ("203.0.113.9", "https")),
}


@pytest.mark.parametrize("case", list(_CASES))
async def test_trusted_peer_cloudflare_headers_are_honoured(both: Both, case: str) -> None:
    extra, (client, proto) = _CASES[case]
    got = await _both_ways(both, extra)  # the default TRUSTED_PROXIES trusts 127.0.0.1
    assert got == {
        "x-forwarded-for": client,
        "x-forwarded-proto": proto,
        "x-forwarded-host": "coord.test",
        "x-request-id": "rid-fw",
    }


@pytest.mark.parametrize("trusted_proxies", ["10.9.9.9/32", "", "::1,172.16.0.0/12"])
@pytest.mark.parametrize("case", list(_CASES))
async def test_untrusted_peer_cloudflare_headers_are_ignored(
    both: Both, case: str, trusted_proxies: str
) -> None:
    extra, _ = _CASES[case]
    got = await _both_ways(both, extra, trusted_proxies=trusted_proxies)
    assert got == {
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": "coord.test",
        "x-request-id": "rid-fw",
    }


@pytest.mark.parametrize(
    ("trusted_proxies", "passed_on"), [(None, True), ("10.9.9.9/32", False), ("", False)]
)
async def test_cloudflare_headers_reach_the_worker_only_from_trusted_peers(
    both: Both, trusted_proxies: str | None, passed_on: bool
) -> None:
    """Forged CF-Connecting-IP / CF-Ray are dropped, so a worker that reads them is not fooled."""
    overrides = {} if trusted_proxies is None else {"trusted_proxies": trusted_proxies}
    front, plain, backend = await both(**overrides)
    via_front_door = await _seen(front, backend, _request(_CF))
    via_aiohttp = await _seen(plain, backend, _request(_CF))
    assert via_front_door == via_aiohttp
    names = {name.lower() for name, _ in via_front_door}
    assert ("cf-connecting-ip" in names) is passed_on
    assert ("cf-ray" in names) is passed_on


@pytest.mark.parametrize(
    ("trusted_proxies", "client", "proto"),
    [(None, "203.0.113.9", "https"), ("10.9.9.9/32", "127.0.0.1", "http")],
)
async def test_requests_with_a_body_forward_the_same(
    both: Both, trusted_proxies: str | None, client: str, proto: str
) -> None:
    """A body takes the front door's task path (the fast path is for requests without one)."""
    overrides = {} if trusted_proxies is None else {"trusted_proxies": trusted_proxies}
    got = await _both_ways(both, _FORGED + _CF, b'{"model": "m", "x": 1}', **overrides)
    assert (got["x-forwarded-for"], got["x-forwarded-proto"]) == (client, proto)


async def test_trust_is_per_connection_on_keep_alive(
    fed_factory: Callable[..., Awaitable[Fed]], backend_factory: BackendFactory
) -> None:
    """Requests pipelined on one connection each get the peer's verdict, with or without CF."""
    fed = await fed_factory(trusted_proxies="10.9.9.9/32")
    backend = await backend_factory()
    await fed.register(backend.url)
    keep = _request(_CF).replace(b"Connection: close\r\n", b"")
    answer = await _raw_request(fed, keep + _request(_CF))
    assert answer.count(b"HTTP/1.1 200 ") == 2
    for record in backend.seen[-2:]:
        assert record["headers"].getall("X-Forwarded-For") == ["127.0.0.1"]
        assert record["headers"].getall("X-Forwarded-Proto") == ["http"]


async def test_coordinator_url_still_follows_x_forwarded_proto_from_any_peer(
    fed_factory: Callable[..., Awaitable[Fed]], backend_factory: BackendFactory
) -> None:
    """X-Forwarded-Proto shapes only the registering client's own reply (see urls.public_url)."""
    fed = await fed_factory(trusted_proxies="")
    backend = await backend_factory()
    reply = await fed.register(backend.url, headers={"X-Forwarded-Proto": "https"})
    assert reply["coordinator_url"].startswith("https://")
