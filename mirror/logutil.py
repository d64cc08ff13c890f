"""Small logging helpers: rate limiting for lines that could repeat per
request (out of file descriptors, malformed requests), escaping for values a
client or peer chose (User-Agent, request lines), and the units a person
reads: sizes in IEC units (`12.0 MiB`), and sizes and durations the way the
configuration is written (`50GiB`, `1h30m`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

_IEC = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_SI = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))
_DURATIONS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


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


def human_size(size: int | float) -> str:
    """Bytes in binary units, one decimal: `512 B`, `12.0 MiB`, `1.2 GiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def config_size(size: int) -> str:
    """A size as a configuration file would give it: `50GiB`, `1.5GB`, or
    the plain number of bytes when no unit divides it (nearly) evenly."""
    for unit, factor in _IEC:
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    for unit, factor in _SI:
        # Up to two decimals: 1.5GB, not 1500MB.
        if size >= factor and (size * 100) % factor == 0:
            number = Decimal(size) / factor
            return f"{number.normalize():f}{unit}"
    return str(size)


def config_duration(seconds: float) -> str:
    """A duration as a configuration file would give it: `5400` is `1h30m`,
    `90` is `1m30s`, `1.5` is `1.5s`, `0.25` is `250ms`, `0` is `0`."""
    if seconds == int(seconds) and seconds > 0:
        whole, parts = int(seconds), []
        for unit, length in _DURATIONS:
            count, whole = divmod(whole, length)
            if count:
                parts.append(f"{count}{unit}")
        return "".join(parts)
    millis = seconds * 1000
    if 0 < seconds < 1 and abs(millis - round(millis)) < 1e-9:
        return f"{round(millis)}ms"
    if seconds == 0:
        return "0"
    return f"{Decimal(repr(seconds)).normalize():f}s"
