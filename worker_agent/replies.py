"""Reading HTTP reply bodies whole, with a cap.

``StreamReader.read(n)`` returns whatever part of a body has arrived (at most ``n`` bytes), not
the whole body: a reply that arrives in several pieces (chunked, or split by the network) would
be cut short. :func:`read_capped` reads to the end and refuses bodies larger than the cap.
"""

from __future__ import annotations

import aiohttp


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``resp``; :class:`aiohttp.ClientPayloadError` beyond ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise aiohttp.ClientPayloadError(f"reply larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
