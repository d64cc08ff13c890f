"""Docker Hub's pull rate limit, as upstream reports it.

Docker Hub answers manifest requests with::

    ratelimit-limit: 100;w=21600        pulls allowed per window (seconds)
    ratelimit-remaining: 76;w=21600     pulls left in the current window
    docker-ratelimit-source: 203.0.113.7  who is being counted (IP or account)

(The source is not kept: an account id has no place in logs or metrics.)

A manifest GET spends one pull; a HEAD spends none. When the budget is gone
upstream answers 429 TOOMANYREQUESTS, usually with Retry-After. `RateLimit`
keeps the last values seen, exports them as gauges, warns when the budget runs
low, and after a 429 says "throttled" until Retry-After (or the window) has
passed, so the mirror stops asking for pulls it cannot get and serves its
cache instead.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mirror.metrics import RegistryMetrics

log = logging.getLogger(__name__)

# At most 18 digits (an int64); a longer number is garbage, not a budget.
_VALUE_RE = re.compile(r"^\s*(\d{1,18})(?!\d)\s*(?:;\s*w\s*=\s*(\d{1,18})(?!\d))?")
# Used when a 429 says neither Retry-After nor a window: a minute, then retry.
DEFAULT_THROTTLE = 60.0
# The longest we stop asking after a 429, whatever upstream says: Docker
# Hub's window is 6 h, so a longer wait can only be a broken or hostile peer.
MAX_THROTTLE = 6 * 3600.0
# Larger budgets than this are clamped (and are not real).
MAX_BUDGET = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int | None
    remaining: int | None
    window: int | None


def parse_ratelimit(value: str | None) -> tuple[int, int | None] | None:
    """`100;w=21600` -> (100, 21600); None when absent or malformed."""
    if not value:
        return None
    match = _VALUE_RE.match(value)
    if not match:
        return None
    window = min(int(match.group(2)), MAX_BUDGET) if match.group(2) else None
    return min(int(match.group(1)), MAX_BUDGET), window


class RateLimit:
    """The upstream pull budget and whether we are throttled."""

    def __init__(
        self,
        metrics: RegistryMetrics,
        *,
        warn_below: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self.warn_below = warn_below
        self._clock = clock
        self.budget = Budget(None, None, None)
        self._throttled_until = 0.0
        self._warned = False
        metrics.throttled.set_function(lambda: 1.0 if self.throttled_for() else 0.0)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Record the rate-limit headers of an upstream response, if any."""
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        remaining = parse_ratelimit(headers.get("ratelimit-remaining"))
        if limit is None and remaining is None:
            return
        window = (remaining or limit or (0, None))[1]
        self.budget = Budget(
            limit[0] if limit else self.budget.limit,
            remaining[0] if remaining else self.budget.remaining,
            window or self.budget.window,
        )
        if self.budget.limit is not None:
            self._metrics.ratelimit_limit.labels().set(self.budget.limit)
        if self.budget.remaining is None:
            return
        self._metrics.ratelimit_remaining.labels().set(self.budget.remaining)
        low = self.budget.remaining < self.warn_below
        if low and not self._warned:
            log.warning(
                "%s pull budget low: %d of %s left (window %ss)",
                self._metrics.registry,
                self.budget.remaining,
                self.budget.limit,
                self.budget.window,
            )
        self._warned = low

    def throttle(self, retry_after: float | None) -> float:
        """Upstream said 429: stop spending pulls for a while. Returns seconds."""
        wait = retry_after if retry_after is not None else self.budget.window
        wait = min(float(wait), MAX_THROTTLE) if wait else DEFAULT_THROTTLE
        self._throttled_until = max(self._throttled_until, self._clock() + wait)
        self._metrics.ratelimit_remaining.labels().set(0)
        log.warning(
            "%s rate limit reached; throttled for %.0fs", self._metrics.registry, wait
        )
        return wait

    def throttled_for(self) -> float | None:
        """Seconds left of throttling (rounded up), or None when not throttled."""
        left = self._throttled_until - self._clock()
        return float(math.ceil(left)) if left > 0 else None
