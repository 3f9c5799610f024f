"""Whose ``CF-Connecting-IP`` and ``CF-Ray`` the proxy believes: ``TRUSTED_PROXIES``.

Behind cloudflared, Cloudflare's edge overwrites both headers, so the client address and the
scheme they give are the real ones. Anyone who reaches the coordinator's port directly could
send them too, so they are honoured only on connections from a trusted peer (cloudflared: a
loopback or compose-network address). From any other peer ``X-Forwarded-For`` is the peer
address and ``X-Forwarded-Proto`` the connection's own scheme, and the forged headers are not
passed on to the worker (one that reads them is not fooled either). The front door
(:mod:`coordinator.frontdoor`) decides once per connection, the aiohttp proxy
(:mod:`coordinator.proxy`) once per request; both ask :meth:`TrustedProxies.trusts`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Loopback (cloudflared on the same host, the embedded edge coordinator) and Docker's default
#: bridge address pool (cloudflared as a service of edge-coordinator.yml's compose network).
DEFAULT_TRUSTED_PROXIES = "127.0.0.0/8,::1/128,172.16.0.0/12"

#: The headers only a trusted peer's are believed and passed on (lower case).
CLOUDFLARE_HEADERS = frozenset({"cf-connecting-ip", "cf-ray"})

_MEMO_SIZE = 1024  # peers remembered; a busy coordinator sees few distinct ones


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Each entry (an IP address or a CIDR network) as a network, or a ``ValueError``."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip()))
        except ValueError as exc:
            raise ValueError(
                f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR network "
                f"(such as 172.16.0.0/12 or fd00::/8): {exc}"
            ) from None
    return tuple(networks)


class TrustedProxies:
    """The peers whose Cloudflare headers are honoured (none when ``networks`` is empty)."""

    __slots__ = ("_memo", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._memo: dict[str, bool] = {}

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (a connection's remote address, as asyncio gives it) is trusted.

        An IPv4-mapped IPv6 address counts as its IPv4 address; anything that is not an IP
        address (a Unix socket peer, no peer) is not trusted.
        """
        if not peer or not self.networks:
            return False
        known = self._memo.get(peer)
        if known is None:
            known = self._memo[peer] = self._check(peer)
            if len(self._memo) > _MEMO_SIZE:
                self._memo.clear()
        return known

    def _check(self, peer: str) -> bool:
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
