"""HTTP header policy shared by every hop that forwards requests (coordinator, worker gateway)."""

from __future__ import annotations

import re
from typing import Any

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
