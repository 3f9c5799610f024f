"""The tunnel URL policy: the only URLs the federation will ever fetch or proxy to."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.urls import InvalidTunnelURL, public_url, request_host, validate_tunnel_url

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

QUICK = [".trycloudflare.com"]


def ok(url: str, suffixes: list[str] | None = None, *, loopback: bool = False) -> str:
    return validate_tunnel_url(
        url, QUICK if suffixes is None else suffixes, allow_loopback=loopback
    )


def rejected(url: Any, suffixes: list[str] | None = None, *, loopback: bool = False) -> str:
    with pytest.raises(InvalidTunnelURL) as info:
        validate_tunnel_url(url, QUICK if suffixes is None else suffixes, allow_loopback=loopback)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Accepted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://abc-def.trycloudflare.com", "https://abc-def.trycloudflare.com"),
        ("https://abc-def.trycloudflare.com/", "https://abc-def.trycloudflare.com"),
        ("HTTPS://ABC-DEF.TryCloudflare.COM", "https://abc-def.trycloudflare.com"),
        ("Https://Abc-Def.trycloudflare.com/", "https://abc-def.trycloudflare.com"),
        (
            "https://lucky-words-here-again.trycloudflare.com",
            "https://lucky-words-here-again.trycloudflare.com",
        ),
        ("https://a.b.trycloudflare.com", "https://a.b.trycloudflare.com"),
        ("https://0.trycloudflare.com", "https://0.trycloudflare.com"),
        ("https://a1-2b.trycloudflare.com", "https://a1-2b.trycloudflare.com"),
        (
            "https://" + "a" * 63 + ".trycloudflare.com",
            "https://" + "a" * 63 + ".trycloudflare.com",
        ),
    ],
)
def test_quick_tunnel_urls_are_accepted_and_normalised(url: str, expected: str) -> None:
    assert ok(url) == expected
    assert ok(expected) == expected  # idempotent
    # Loopback mode does not change the verdict on public URLs.
    assert ok(url, loopback=True) == expected


# --------------------------------------------------------------------------------------------
# Rejected


REJECTED = {
    # scheme
    "http": "http://abc-def.trycloudflare.com",
    "http-slash": "http://abc-def.trycloudflare.com/",
    "ftp": "ftp://abc-def.trycloudflare.com",
    "ws": "ws://abc-def.trycloudflare.com",
    "wss": "wss://abc-def.trycloudflare.com",
    "javascript": "javascript://abc-def.trycloudflare.com",
    "file": "file://abc-def.trycloudflare.com/",
    "no-scheme": "abc-def.trycloudflare.com",
    "scheme-relative": "//abc-def.trycloudflare.com",
    "https-no-slashes": "https:abc-def.trycloudflare.com",
    "https-one-slash": "https:/abc-def.trycloudflare.com",
    "https-three-slashes": "https:///abc-def.trycloudflare.com",
    # IP literals
    "ipv4": "https://1.2.3.4",
    "ipv4-metadata": "https://169.254.169.254",
    "ipv4-metadata-http": "http://169.254.169.254",
    "ipv4-metadata-path": "http://169.254.169.254/latest/meta-data/",
    "ipv4-loopback": "https://127.0.0.1",
    "ipv4-loopback-port": "http://127.0.0.1:8000",
    "ipv4-any": "https://0.0.0.0",
    "ipv4-private": "https://10.0.0.1",
    "ipv4-decimal": "https://2130706433",
    "ipv4-hex": "https://0x7f000001",
    "ipv4-short": "https://127.1",
    "ipv4-octal": "https://0177.0.0.1",
    "ipv6-loopback": "https://[::1]",
    "ipv6-loopback-http-port": "http://[::1]:8000",
    "ipv6-loopback-full": "https://[0:0:0:0:0:0:0:1]",
    "ipv6-mapped": "https://[::ffff:127.0.0.1]",
    "ipv6-mapped-metadata": "https://[::ffff:169.254.169.254]",
    "ipv6-link-local": "https://[fe80::1]",
    "ipv6-doc": "https://[2001:db8::1]",
    "ipv6-metadata": "https://[fd00:ec2::254]",
    "ipv6-unterminated": "https://[::1",
    "ipv6-bracketed-name": "https://[abc-def.trycloudflare.com]",
    "localhost": "https://localhost",
    "localhost-port": "http://localhost:8000",
    # credentials
    "userinfo": "https://a@b.trycloudflare.com",
    "userinfo-password": "https://user:pass@abc-def.trycloudflare.com",
    "userinfo-empty": "https://@abc-def.trycloudflare.com",
    "userinfo-colon": "https://:@abc-def.trycloudflare.com",
    "userinfo-swap": "https://abc-def.trycloudflare.com@evil.com",
    "userinfo-swap-slash": "https://abc-def.trycloudflare.com@evil.com/",
    "userinfo-backslash": "https://evil.com\\@abc-def.trycloudflare.com",
    "userinfo-encoded": "https://evil.com%40abc-def.trycloudflare.com",
    # ports
    "port-443": "https://abc-def.trycloudflare.com:443",
    "port-8443": "https://abc-def.trycloudflare.com:8443",
    "port-0": "https://abc-def.trycloudflare.com:0",
    "port-huge": "https://abc-def.trycloudflare.com:99999",
    "port-negative": "https://abc-def.trycloudflare.com:-1",
    "port-word": "https://abc-def.trycloudflare.com:https",
    "port-twice": "https://abc-def.trycloudflare.com:443:443",
    # look-alikes
    "suffix-then-evil": "https://trycloudflare.com.evil.net",
    "sub-suffix-then-evil": "https://abc-def.trycloudflare.com.evil.net",
    "glued": "https://eviltrycloudflare.com",
    "glued-dash": "https://evil-trycloudflare.com",
    "bare-suffix": "https://trycloudflare.com",
    "bare-suffix-slash": "https://trycloudflare.com/",
    "dot-suffix": "https://.trycloudflare.com",
    "other-tld": "https://abc-def.trycloudflare.co",
    "other-tld-net": "https://abc-def.trycloudflare.net",
    "typo": "https://abc-def.trycIoudflare.com",
    "trailing-dot": "https://abc-def.trycloudflare.com.",
    "double-dot": "https://abc..trycloudflare.com",
    "leading-dash": "https://-abc.trycloudflare.com",
    "trailing-dash": "https://abc-.trycloudflare.com",
    "underscore": "https://a_b.trycloudflare.com",
    "long-label": "https://" + "a" * 64 + ".trycloudflare.com",
    "percent-dot": "https://abc%2etrycloudflare.com",
    "percent-letter": "https://%61bc.trycloudflare.com",
    "semicolon": "https://abc-def.trycloudflare.com;evil.com",
    "comma": "https://abc-def.trycloudflare.com,evil.com",
    "star": "https://*.trycloudflare.com",
    "quote": "https://abc'.trycloudflare.com",
    # IDN / unicode (homographs)
    "cyrillic-a-label": "https://\u0430bc.trycloudflare.com",
    "cyrillic-a-suffix": "https://abc.trycloudfl\u0430re.com",
    "fullwidth-dot": "https://abc\uff0etrycloudflare.com",
    "ideographic-dot": "https://abc\u3002trycloudflare.com",
    "fullwidth-letters": "https://\uff41\uff42\uff43.trycloudflare.com",
    "zero-width": "https://abc\u200b.trycloudflare.com",
    "rtl-override": "https://abc\u202e.trycloudflare.com",
    "emoji": "https://\U0001f600.trycloudflare.com",
    "dotless-i": "https://abc.tryclo\u0131dflare.com",
    "nfkc-trap": "https://abc.trycloudflare.com\u2100evil",
    # path, query, fragment
    "path": "https://abc-def.trycloudflare.com/path",
    "path-double-slash": "https://abc-def.trycloudflare.com//",
    "path-dot": "https://abc-def.trycloudflare.com/.",
    "path-dotdot": "https://abc-def.trycloudflare.com/../x",
    "path-encoded": "https://abc-def.trycloudflare.com/%2e",
    "query": "https://abc-def.trycloudflare.com?q=1",
    "query-after-slash": "https://abc-def.trycloudflare.com/?q=1",
    "fragment": "https://abc-def.trycloudflare.com#frag",
    "fragment-after-slash": "https://abc-def.trycloudflare.com/#frag",
    "service-path": "https://abc-def.trycloudflare.com/service/echo/",
    # empty host
    "empty": "",
    "scheme-only": "https://",
    "scheme-slash": "https:///",
    "port-only": "https://:443",
    "scheme-colon": "https:",
    "just-slashes": "//",
    # control characters and whitespace
    "newline": "https://abc-def.trycloudflare.com\n",
    "crlf-injection": "https://abc-def.trycloudflare.com\r\nX-Injected: 1",
    "tab": "https://abc\t-def.trycloudflare.com",
    "inner-newline": "https://abc\n-def.trycloudflare.com",
    "space": "https://abc def.trycloudflare.com",
    "leading-space": " https://abc-def.trycloudflare.com",
    "trailing-space": "https://abc-def.trycloudflare.com ",
    "nul": "https://abc-def.trycloudflare.com\x00",
    "nul-inside": "https://abc\x00.trycloudflare.com",
    "del": "https://abc-def.trycloudflare.com\x7f",
    "bell": "\x07https://abc-def.trycloudflare.com",
    "nbsp": "https://abc-def.trycloudflare.com\xa0",
    # too long
    "long-host": "https://" + "a" * 2100 + ".trycloudflare.com",
    "long-2049": "https://abc-def.trycloudflare.com/" + "a" * (2049 - 34),
    "long-100k": "https://" + "x." * 50_000 + "trycloudflare.com",
}


@pytest.mark.parametrize("url", list(REJECTED.values()), ids=list(REJECTED))
def test_rejected(url: str) -> None:
    rejected(url)


@pytest.mark.parametrize("url", list(REJECTED.values()), ids=list(REJECTED))
def test_rejected_with_loopback_allowed_too(url: str) -> None:
    """Dev mode widens the policy to loopback only, never to these."""
    if url in LOOPBACK_OK:
        return
    rejected(url, loopback=True)


def test_length_boundary() -> None:
    assert "2048" in rejected("h" * 2049)
    assert "2048" in rejected("https://abc-def.trycloudflare.com" + "/" * 2048)
    # A 2048-character URL is not refused for its length (here: for its path).
    assert "2048" not in rejected("https://abc-def.trycloudflare.com/" + "a" * (2048 - 34))


def test_host_longer_than_a_dns_name_is_rejected() -> None:
    """A DNS name has at most 253 characters; longer hosts cannot be real tunnel hostnames."""
    labels = ["a" * 63] * 5  # 5 * 64 = 320 characters before the suffix
    url = "https://" + ".".join(labels) + ".trycloudflare.com"
    assert len(url) < 2048
    rejected(url)


@pytest.mark.parametrize("value", [None, b"https://abc-def.trycloudflare.com", 42, ["https://x"]])
def test_non_strings_are_rejected(value: Any) -> None:
    rejected(value)


def test_messages_name_the_rule() -> None:
    assert "https" in rejected("http://abc-def.trycloudflare.com")
    assert "credentials" in rejected("https://a@b.trycloudflare.com")
    assert "port" in rejected("https://abc-def.trycloudflare.com:443")
    assert "IP" in rejected("https://169.254.169.254")
    assert "suffix" in rejected("https://eviltrycloudflare.com")
    assert "origin" in rejected("https://abc-def.trycloudflare.com/x")
    assert "ASCII" in rejected("https://\u0430bc.trycloudflare.com")
    assert "host" in rejected("https://")
    assert "loopback" in rejected("http://127.0.0.1:8000")


def test_invalid_tunnel_url_is_a_value_error() -> None:
    assert issubclass(InvalidTunnelURL, ValueError)


# --------------------------------------------------------------------------------------------
# Loopback (dev mode)

LOOPBACK_OK = {
    "http://127.0.0.1:8000": "http://127.0.0.1:8000",
    "http://127.0.0.1:8000/": "http://127.0.0.1:8000",
    "http://127.0.0.1:9": "http://127.0.0.1:9",
    "http://127.0.0.1:65535": "http://127.0.0.1:65535",
    "HTTP://127.0.0.1:8000": "http://127.0.0.1:8000",
    "https://127.0.0.1:8443": "https://127.0.0.1:8443",
    "http://localhost:8000": "http://localhost:8000",
    "http://LOCALHOST:8000/": "http://localhost:8000",
    "http://[::1]:8000": "http://[::1]:8000",
    "http://[::1]:8000/": "http://[::1]:8000",
}


@pytest.mark.parametrize(("url", "expected"), list(LOOPBACK_OK.items()))
def test_loopback_is_accepted_in_dev_mode(url: str, expected: str) -> None:
    assert ok(url, loopback=True) == expected
    assert ok(expected, loopback=True) == expected


@pytest.mark.parametrize("url", list(LOOPBACK_OK))
def test_loopback_is_rejected_outside_dev_mode(url: str) -> None:
    assert "loopback" in rejected(url)
    assert "loopback" in rejected(url, ["localhost", "127.0.0.1", ".0.0.1"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1",  # no port
        "http://127.0.0.1/",
        "http://127.0.0.1:",
        "http://localhost",
        "http://[::1]",
        "https://[::1]",
        "https://127.0.0.1",
        "ftp://127.0.0.1:21",  # scheme
        "ws://127.0.0.1:8000",
        "gopher://localhost:70",
        "http://127.0.0.1:8000/path",  # not an origin
        "http://127.0.0.1:8000?x=1",
        "http://127.0.0.1:8000#x",
        "http://user@127.0.0.1:8000",  # credentials
        "http://user:pw@localhost:8000",
        "http://127.0.0.1:99999",  # bad ports
        "http://127.0.0.1:port",
        "http://127.0.0.2:8000",  # other addresses are not "loopback" here
        "http://127.1:8000",
        "http://0.0.0.0:8000",
        "http://169.254.169.254:80",
        "http://10.0.0.1:8000",
        "http://[::ffff:127.0.0.1]:8000",
        "http://[0:0:0:0:0:0:0:1]:8000",
        "http://localhost.:8000",
        "http://localhost.evil.com:8000",
        "http://127.0.0.1.nip.io:8000",
    ],
)
def test_loopback_rules_in_dev_mode(url: str) -> None:
    rejected(url, loopback=True)


# --------------------------------------------------------------------------------------------
# Custom suffixes


@pytest.mark.parametrize(
    ("suffixes", "url", "expected"),
    [
        (["example.org"], "https://example.org", "https://example.org"),
        (["example.org"], "https://x.example.org", "https://x.example.org"),
        (["example.org"], "https://a.b.example.org/", "https://a.b.example.org"),
        ([".example.org"], "https://x.example.org", "https://x.example.org"),
        (["EXAMPLE.org"], "https://x.example.org", "https://x.example.org"),
        ([" example.org "], "https://x.example.org", "https://x.example.org"),
        (["", "example.org"], "https://x.example.org", "https://x.example.org"),
        ([".trycloudflare.com", "example.org"], "https://x.example.org", "https://x.example.org"),
        (
            [".trycloudflare.com", "example.org"],
            "https://abc.trycloudflare.com",
            "https://abc.trycloudflare.com",
        ),
        (
            ("tunnels.example.net",),
            "https://w1.tunnels.example.net",
            "https://w1.tunnels.example.net",
        ),
    ],
)
def test_custom_suffixes_accept(suffixes: list[str], url: str, expected: str) -> None:
    assert validate_tunnel_url(url, suffixes) == expected


@pytest.mark.parametrize(
    ("suffixes", "url"),
    [
        (["example.org"], "https://badexample.org"),
        (["example.org"], "https://example.org.evil.net"),
        (["example.org"], "https://example.organic.com"),
        (["example.org"], "https://xexample.org"),
        (["example.org"], "https://example.or"),
        (["example.org"], "https://abc.trycloudflare.com"),
        ([".example.org"], "https://example.org"),  # a leading dot excludes the bare suffix
        ([".example.org"], "https://badexample.org"),
        ([""], "https://example.org"),
        (["  "], "https://example.org"),
        ([], "https://abc.trycloudflare.com"),
        (["example.org"], "http://x.example.org"),
        (["example.org"], "https://x.example.org:8443"),
        (["example.org"], "https://u@x.example.org"),
        (["1.2.3.4"], "https://1.2.3.4"),
        (["0.0.1"], "https://127.0.0.1"),
        (["254.169.254"], "https://169.254.169.254"),
        (["org"], "https://org"),  # single-label hosts are never accepted
    ],
)
def test_custom_suffixes_reject(suffixes: list[str], url: str) -> None:
    with pytest.raises(InvalidTunnelURL):
        validate_tunnel_url(url, suffixes)


def test_suffixes_may_be_any_iterable() -> None:
    assert validate_tunnel_url("https://x.example.org", iter(["example.org"])) == (
        "https://x.example.org"
    )
    assert validate_tunnel_url("https://x.example.org", frozenset({"example.org"})) == (
        "https://x.example.org"
    )


# --------------------------------------------------------------------------------------------
# Properties

SUFFIX_SETS = [
    [".trycloudflare.com"],
    ["example.org"],
    [".trycloudflare.com", "tunnels.example.net"],
]

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
junk = st.sampled_from(
    ["", "/", ":443", "@", "..", ".", "-", "_", "%2e", "?", "#", "/x", "\n", "\u0430", "[", "]"]
)
hostish_suffixes = st.sampled_from(
    [
        ".trycloudflare.com",
        "trycloudflare.com",
        ".trycloudflare.com.evil.net",
        "trycloudflare.com",
        ".example.org",
        "example.org",
        ".badexample.org",
        ".tunnels.example.net",
        ".evil.net",
        "",
    ]
)


@st.composite
def url_like(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["https://", "http://", "HTTPS://", "", "//", "https:"]))
    parts = draw(st.lists(labels, min_size=0, max_size=4))
    host = ".".join(parts) + draw(hostish_suffixes)
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(host)))
        host = host[:pos] + draw(junk) + host[pos:]
    return scheme + host + draw(junk)


def _host_matches(host: str, suffixes: list[str]) -> bool:
    for suffix in suffixes:
        s = suffix.strip().lower()
        if not s:
            continue
        if s.startswith("."):
            if host.endswith(s) and len(host) > len(s):
                return True
        elif host == s or host.endswith("." + s):
            return True
    return False


def _check_accepted(result: str, suffixes: list[str]) -> None:
    assert result.startswith("https://")
    parts = urlsplit(result)
    host = parts.hostname or ""
    assert result == f"https://{host}"
    assert (parts.port, parts.username, parts.password) == (None, None, None)
    assert host.isascii()
    assert host == host.lower()
    assert _host_matches(host, suffixes)
    assert len(result) <= 2048
    assert validate_tunnel_url(result, suffixes) == result  # normalisation is idempotent


@PROPS
@given(url_like(), st.sampled_from(SUFFIX_SETS))
def test_accepted_urls_are_https_origins_under_an_allowed_suffix(
    url: str, suffixes: list[str]
) -> None:
    try:
        result = validate_tunnel_url(url, suffixes)
    except InvalidTunnelURL:
        return
    _check_accepted(result, suffixes)


@PROPS
@given(st.text(max_size=200), st.sampled_from(SUFFIX_SETS), st.booleans())
def test_random_text_only_ever_raises_invalid_tunnel_url(
    text: str, suffixes: list[str], loopback: bool
) -> None:
    for candidate in (text, "https://" + text, "http://127.0.0.1:" + text):
        try:
            result = validate_tunnel_url(candidate, suffixes, allow_loopback=loopback)
        except InvalidTunnelURL:
            continue
        if not loopback:
            _check_accepted(result, suffixes)


@PROPS
@given(
    st.text(alphabet=st.characters(codec="ascii"), max_size=120),
    st.sampled_from(SUFFIX_SETS),
)
def test_random_ascii_after_scheme(text: str, suffixes: list[str]) -> None:
    for candidate in ("https://" + text, "https://abc.trycloudflare.com" + text, text):
        try:
            result = validate_tunnel_url(candidate, suffixes)
        except InvalidTunnelURL:
            continue
        _check_accepted(result, suffixes)


@PROPS
@given(st.lists(labels, min_size=1, max_size=4))
def test_well_formed_quick_tunnel_hosts_are_accepted(parts: list[str]) -> None:
    host = ".".join(parts) + ".trycloudflare.com"
    assert ok(f"https://{host}") == f"https://{host}"
    assert ok(f"https://{host.upper()}/") == f"https://{host}"
    rejected(f"http://{host}")
    rejected(f"https://{host}:443")
    rejected(f"https://u@{host}")
    rejected(f"https://{host}/p")
    rejected(f"https://{host}.evil.net")


@PROPS
@given(st.ip_addresses())
def test_ip_literals_are_always_rejected(address: Any) -> None:
    shown = f"[{address}]" if address.version == 6 else str(address)
    rejected(f"https://{shown}", [".trycloudflare.com", str(address)])
    if str(address) not in ("127.0.0.1", "::1"):
        rejected(f"http://{shown}:8000", loopback=True)


# ---------------------------------------------------------------- the coordinator's public URL


@pytest.mark.parametrize(
    ("configured", "scheme", "proto", "host", "expected"),
    [
        (None, "http", None, "coord.test", "http://coord.test"),
        ("", "http", None, "coord.test:8080", "http://coord.test:8080"),
        ("https://c.example.org/", "http", "gopher", "evil/x", "https://c.example.org"),
        (None, "http", "HTTPS", "coord.test", "https://coord.test"),
        (None, "https", "gopher", "coord.test", "https://coord.test"),
        (None, "https", "", "coord.test", "https://coord.test"),
        (None, "http", None, "[::1]:8080", "http://[::1]:8080"),
        (None, "http", None, "a b", "http://127.0.0.1"),
        (None, "http", None, "a/b", "http://127.0.0.1"),
        (None, "http", None, "", "http://127.0.0.1"),
        (None, "http", None, "h" * 261, "http://127.0.0.1"),
    ],
)
def test_public_url(
    configured: str | None, scheme: str, proto: str | None, host: str, expected: str
) -> None:
    assert public_url(configured, scheme=scheme, forwarded_proto=proto, host=host) == expected


@pytest.mark.parametrize(
    ("header", "sockname", "expected"),
    [
        ("coord.test", ("10.0.0.1", 8080), "coord.test"),
        ("", ("10.0.0.1", 8080), ""),
        (None, ("10.0.0.1", 8080), "10.0.0.1"),
        (None, ("::1", 8080, 0, 0), "[::1]"),
        (None, "/run/coordinator.sock", "/run/coordinator.sock"),
        (None, None, ""),
    ],
)
def test_request_host_is_aiohttps(header: str | None, sockname: object, expected: str) -> None:
    assert request_host(header, sockname) == expected
