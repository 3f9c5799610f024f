"""SSRF: every tunnel URL trick is refused where a URL enters the federation.

The coordinator's ``POST /api/worker/register`` is the hop that accepts a URL it will later
fetch (the proxy connects to ``tunnel_url``). The worker agent never accepts a tunnel URL from
the network (it reads its own from cloudflared), so it has nothing to validate here. Each trick is
sent both to a production coordinator (``.trycloudflare.com`` only) and to a dev-mode one
(loopback allowed): refused with 422 ``invalid_tunnel_url``, and nothing registered or replaced,
even when the legitimate owner (right id, right token) asks to move to the bad URL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from coordinator.urls import InvalidTunnelURL, validate_tunnel_url
from tests.security.conftest import Federation, register_body

Factory = Callable[..., Awaitable[Federation]]

TRICKS = [
    # scheme
    "http://abc-def.trycloudflare.com",
    "ftp://abc-def.trycloudflare.com",
    "file:///etc/passwd",
    "gopher://abc-def.trycloudflare.com",
    "javascript:alert(1)",
    "//abc-def.trycloudflare.com",
    "abc-def.trycloudflare.com",
    # IP literals, v4 and v6, in every spelling
    "https://1.2.3.4",
    "https://169.254.169.254",
    "https://169.254.169.254/latest/meta-data/",
    "https://[fd00:ec2::254]",
    "https://[::ffff:169.254.169.254]",
    "https://[::1]",
    "https://0x7f000001",
    "https://2130706433",
    "https://0177.0.0.1",
    "https://127.1",
    "https://0.0.0.0",
    "https://10.0.0.1",
    "http://169.254.169.254:80",
    "http://0x7f000001:8080",
    "http://2130706433:8080",
    "http://127.1:8080",
    "http://[::ffff:127.0.0.1]:8080",
    "http://0.0.0.0:8080",
    "http://127.0.0.2:8080",
    # localhost and friends
    "https://localhost",
    "http://localhost",
    "https://localhost.trycloudflare.com.evil.com",
    "http://localhost.:8080",
    "https://metadata.google.internal",
    # userinfo
    "https://user:pass@abc-def.trycloudflare.com",
    "https://abc-def.trycloudflare.com@evil.com",
    "https://evil.com@abc-def.trycloudflare.com",
    "https://evil.com#@abc-def.trycloudflare.com",
    "http://127.0.0.1:8080@evil.com",
    "https://evil.com\\@abc-def.trycloudflare.com",
    # look-alike suffixes
    "https://trycloudflare.com",
    "https://.trycloudflare.com",
    "https://abc-def.trycloudflare.com.evil.com",
    "https://abc-deftrycloudflare.com",
    "https://abc-def.trycloudflare.co",
    "https://abc-def.trycloudflare.com.",
    "https://abc-def.trycloudflare.com..",
    "https://abc-def.trycloudflare.com%2eevil.com",
    "https://abc-def.trycloudf1are.com",
    "https://abc-def.try-cloudflare.com",
    # IDN homographs and punycode
    "https://abc-def.trycloudfl\u0430re.com",  # Cyrillic a
    "https://abc-def.trycloudflare.c\u043em",  # Cyrillic o
    "https://abc-def.xn--trycloudflre-xyz.com",
    "https://xn--80ak6aa92e.com",
    "https://abc\uff0etrycloudflare.com",  # fullwidth dot
    "https://abc-def.trycloudflare\u3002com",  # ideographic full stop
    # ports
    "https://abc-def.trycloudflare.com:8443",
    "https://abc-def.trycloudflare.com:443",
    "https://abc-def.trycloudflare.com:0",
    "https://abc-def.trycloudflare.com:99999",
    "http://127.0.0.1",
    "http://127.0.0.1:0x1f90",
    # paths, queries, fragments, backslashes, percent-encoding
    "https://abc-def.trycloudflare.com/path",
    "https://abc-def.trycloudflare.com?x=1",
    "https://abc-def.trycloudflare.com#frag",
    "https://abc-def.trycloudflare.com\\.evil.com",
    "https:\\\\abc-def.trycloudflare.com",
    "https://abc-def%2etrycloudflare.com",
    "https://%61bc-def.trycloudflare.com",
    "https://abc-def.trycloudflare.com%00.evil.com",
    "https://abc-def.trycloudflare.com%2f@evil.com",
    # whitespace and control characters
    " https://abc-def.trycloudflare.com",
    "https://abc-def.trycloudflare.com\n",
    "https://abc-def.trycloudflare.com\r\nX-Injected: 1",
    "https://abc-def.trycloudflare.com\t",
    "https://abc\x00def.trycloudflare.com",
    # malformed hosts
    "https://-abc.trycloudflare.com",
    "https://abc_def.trycloudflare.com",
    "https://" + "a" * 64 + ".trycloudflare.com",
    "https://" + "a." * 130 + "trycloudflare.com",
    "https://[abc-def.trycloudflare.com]",
    "https://",
]


@pytest.mark.parametrize("url", TRICKS)
@pytest.mark.parametrize("dev", [False, True])
def test_the_policy_refuses_every_trick(url: str, dev: bool) -> None:
    with pytest.raises(InvalidTunnelURL):
        validate_tunnel_url(url, [".trycloudflare.com"], allow_loopback=dev)


def test_the_policy_still_accepts_what_it_should() -> None:
    suffixes = [".trycloudflare.com"]
    ok = validate_tunnel_url("https://Abc-Def.TryCloudflare.com/", suffixes)
    assert ok == "https://abc-def.trycloudflare.com"
    assert validate_tunnel_url("http://127.0.0.1:8080", suffixes, allow_loopback=True) == (
        "http://127.0.0.1:8080"
    )


async def _refused_everywhere(fed: Federation, http: aiohttp.ClientSession) -> None:
    before = await fed.snapshot(http)
    url = f"{fed.url}/api/worker/register"
    owner = {"worker_id": "w-legit", "worker_token": fed.worker["worker_token"]}
    for trick in TRICKS:
        for extra in ({}, {"worker_id": "w-new"}, owner):
            body = register_body("http://127.0.0.1:1", **extra) | {"tunnel_url": trick}
            async with http.post(url, json=body) as resp:
                reply = await resp.json()
                # 422 from the policy, or from the schema (a URL shorter than 8 characters).
                assert resp.status == 422, (trick, reply)
                assert reply["error"] in ("invalid_tunnel_url", "invalid_request"), (trick, reply)
    after = await fed.snapshot(http)
    assert after == {
        wid: w | {"last_heartbeat_age_s": after[wid]["last_heartbeat_age_s"]}
        for wid, w in before.items()
    }


async def test_register_refuses_every_trick_in_production_mode(
    fed_factory: Factory, http: aiohttp.ClientSession
) -> None:
    # The fixture's worker needs loopback; production mode is switched on after it registered.
    fed = await fed_factory()
    fed.coordinator.settings.dev_allow_loopback = False
    await _refused_everywhere(fed, http)


async def test_register_refuses_every_trick_in_dev_mode(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    await _refused_everywhere(fed, http)


async def test_the_proxy_never_connects_to_a_refused_url(
    fed: Federation, http: aiohttp.ClientSession
) -> None:
    """After all the tricks, requests still reach only the one legitimate worker."""
    await _refused_everywhere(fed, http)
    for _ in range(5):
        async with http.get(f"{fed.url}/service/echo/who") as resp:
            assert resp.status == 200
            assert (await resp.json())["worker_id"] == "w-legit"
