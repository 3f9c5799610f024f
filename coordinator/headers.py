"""HTTP header policy shared by every hop that forwards requests (coordinator, worker gateway)."""

from __future__ import annotations

import re
from typing import Any

from multidict import CIMultiDict

from coordinator.protocol import INTERNAL_HEADER_PREFIX, REQUEST_ID_HEADER

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1, plus common extras).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

#: An ``X-Request-Id`` kept as sent; any other value is replaced by a fresh id.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def drop_set(headers: Any) -> set[str]:
    """Hop-by-hop headers plus those the ``Connection`` header names (lower case)."""
    drop = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(","))
    return drop


#: Response headers a relaying hop sets itself (the upstream's copies are dropped).
REPLACED_RESPONSE = frozenset({"x-request-id", "content-length", "transfer-encoding"})


def relayed_response_headers(raw: list[tuple[bytes, bytes]], request_id: str) -> CIMultiDict[str]:
    """An upstream response's headers as the next hop sends them on: hop-by-hop headers (and
    those ``Connection`` names), internal ``X-RMA-*`` headers and the ones the relay sets itself
    are dropped; ``X-Request-Id`` is the request's own."""
    decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
    drop = set(HOP_BY_HOP)
    for key, value in decoded:
        if key.lower() == "connection":
            drop.update(token.strip().lower() for token in value.split(","))
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in decoded:
        lower = key.lower()
        if lower in drop or lower in REPLACED_RESPONSE or lower.startswith(INTERNAL_HEADER_PREFIX):
            continue
        headers.add(key, value)
    headers[REQUEST_ID_HEADER] = request_id
    return headers
