"""Small logging helpers: rate limiting for lines that could repeat per
request (out of file descriptors, malformed requests), and escaping for
values a client or peer chose (User-Agent, request lines)."""

from __future__ import annotations

import time
from collections.abc import Callable


class OncePer:
    """`ready()` is true at most once per `interval` seconds."""

    def __init__(
        self, interval: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._next = 0.0

    def ready(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True


def escape(value: str, limit: int = 256) -> str:
    """`value` with quotes, backslashes and anything not printable ASCII
    escaped, cut to `limit` characters: safe inside a quoted log field."""
    out = []
    for char in value[:limit]:
        if char in '"\\':
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}")
    if len(value) > limit:
        out.append("...")
    return "".join(out)
