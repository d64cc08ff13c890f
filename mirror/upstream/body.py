"""Reading a response body into memory, bounded.

One loop for every body the upstream layer keeps whole (manifests, tag
lists, token responses): read to EOF in as many reads as the network splits
the body into, and stop as soon as it is longer than allowed, whatever
Content-Length said.
"""

from __future__ import annotations

import aiohttp

_READ = 1024 * 1024


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it is (or declares itself) longer than
    `limit` bytes; at most `limit + 1` bytes are read. Raises what reading
    the body raises (aiohttp.ClientError, TimeoutError)."""
    if (resp.content_length or 0) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    while data := await resp.content.read(min(limit + 1 - size, _READ)):
        parts.append(data)
        size += len(data)
        if size > limit:
            return None
    return b"".join(parts)
