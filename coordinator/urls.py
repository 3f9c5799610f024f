"""Tunnel URL policy: the only URLs the federation will ever fetch or proxy to.

A tunnel URL is an origin (scheme + host, no path, query, credentials or port) served over
https from a host under an allowed suffix. ``http://127.0.0.1:<port>`` (and ``localhost``,
``[::1]``) is accepted only when loopback is explicitly allowed, for local development.

Also here: the coordinator's own public URL as a request shows it (:func:`public_url`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,260}$")


class InvalidTunnelURL(ValueError):
    """The URL breaks the tunnel URL policy; ``str(exc)`` says which rule."""


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _suffix_matches(host: str, suffix: str) -> bool:
    suffix = suffix.strip().lower()
    if not suffix:
        return False
    if suffix.startswith("."):
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == suffix or host.endswith("." + suffix)


def validate_tunnel_url(
    url: str, allowed_suffixes: Iterable[str], *, allow_loopback: bool = False
) -> str:
    """The normalised origin (``scheme://host[:port]``), or :class:`InvalidTunnelURL`."""
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise InvalidTunnelURL("tunnel_url must be a non-empty string of at most 2048 characters")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise InvalidTunnelURL("tunnel_url must be printable ASCII (IDN hosts are not accepted)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidTunnelURL(f"tunnel_url does not parse: {exc}") from None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise InvalidTunnelURL("tunnel_url must not carry credentials")
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidTunnelURL("tunnel_url has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidTunnelURL("tunnel_url must be an origin, without path, query or fragment")

    if host in _LOOPBACK_HOSTS:
        if not allow_loopback:
            raise InvalidTunnelURL("loopback tunnel URLs are accepted only in dev mode")
        if scheme not in ("http", "https") or port is None:
            raise InvalidTunnelURL("loopback tunnel URLs must be http(s)://127.0.0.1:<port>")
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}"

    if scheme != "https":
        raise InvalidTunnelURL("tunnel_url must use https")
    if _is_ip_literal(host) or host.startswith("["):
        raise InvalidTunnelURL("tunnel_url must name a host, not an IP address")
    if port is not None:
        raise InvalidTunnelURL("tunnel_url must not name a port")
    labels = host.split(".")
    if len(host) > 253:
        raise InvalidTunnelURL("tunnel_url host is longer than a DNS name (253 characters)")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise InvalidTunnelURL("tunnel_url host is not a valid DNS name")
    if not any(_suffix_matches(host, s) for s in allowed_suffixes):
        raise InvalidTunnelURL("tunnel_url host is not under an allowed suffix")
    return f"https://{host}"


def origin_key(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a validated tunnel origin, for connection pooling."""
    parts = urlsplit(url)
    scheme = parts.scheme
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def public_url(
    configured: str | None, *, scheme: str, forwarded_proto: str | None, host: str
) -> str:
    """The coordinator's URL as a worker should use it, from one request's header values.

    ``configured`` (``COORDINATOR_PUBLIC_URL``) wins. Otherwise: ``X-Forwarded-Proto`` when it
    is http or https, else the connection's ``scheme``; ``host`` (see :func:`request_host`)
    when it looks like a host, else ``127.0.0.1``. The aiohttp routes and the front door
    (:mod:`coordinator.frontdoor`) both answer registrations with it.

    ``X-Forwarded-Proto`` counts from any peer, not only from ``TRUSTED_PROXIES``
    (:mod:`coordinator.forwarding`): like ``Host``, which every client chooses, it only shapes
    the reply to the client that sent it, and is neither stored nor shown to anyone else.
    """
    if configured:
        return configured.rstrip("/")
    proto = scheme if forwarded_proto is None else forwarded_proto.lower()
    if proto not in ("http", "https"):
        proto = scheme
    if not _HOST.match(host):
        host = "127.0.0.1"
    return f"{proto}://{host}"


def request_host(host_header: str | None, sockname: object) -> str:
    """The request's host as aiohttp's ``Request.host`` gives it (aiohttp 3.14).

    The first ``Host`` header; without one, the address of the socket the request arrived on
    (an IPv6 one in brackets), or ``""``.
    """
    if host_header is not None:
        return host_header
    if sockname is None:
        return ""
    if isinstance(sockname, tuple):
        return f"[{sockname[0]}]" if len(sockname) == 4 else str(sockname[0])
    return str(sockname)
