"""Stats: the short, bounded history the status page shows.

Prometheus keeps history for those who run it; the status page (`GET /`,
`/status.json`) must show some without it, from memory, at a constant cost
per request:

* `RequestHistory`: requests by cache result per wall-clock minute, in a
  ring of `MINUTES` buckets (the last hour), plus totals since start. Fed by
  the request middleware with the same result it labels
  `mirror_http_request_duration_seconds{cache}` with, so the totals equal
  that histogram's counts summed over routes.
* `TopRepositories`: manifest GETs per (registry, repository), at most
  `max_keys` of them; when full, the least pulled half is dropped in one
  pass (amortised O(log n) per pull, memory bounded).
* the last `EVICTIONS_KEPT` eviction passes that removed something.

Nothing here does I/O or knows about HTTP; every method is synchronous and
called from the event loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

# Cache results a request can have (mirror.metrics.CACHE_RESULTS less
# "none", which means no lookup was made).
RESULTS = ("hit", "miss", "joined", "stale", "uncached")
MINUTES = 60
BUCKET_SECONDS = 60
TOP_KEYS = 4096
EVICTIONS_KEPT = 20

_INDEX = {result: i for i, result in enumerate(RESULTS)}


@dataclass(frozen=True, slots=True)
class Minute:
    """Requests by cache result in the minute starting at `start`."""

    start: float  # unix seconds, a multiple of BUCKET_SECONDS
    counts: dict[str, int]


class RequestHistory:
    """Per-minute counts of requests by cache result: a fixed ring."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # Slot i holds the minute whose number is `_minute[i]` (-1: none).
        self._minute = [-1] * MINUTES
        self._counts = [[0] * len(RESULTS) for _ in range(MINUTES)]
        self._totals = [0] * len(RESULTS)

    def record(self, result: str | None) -> None:
        """Count one request; None (no lookup) and unknown results are not
        counted."""
        index = _INDEX.get(result) if result is not None else None
        if index is None:
            return
        minute = int(self._clock() // BUCKET_SECONDS)
        slot = minute % MINUTES
        counts = self._counts[slot]
        if self._minute[slot] != minute:
            self._minute[slot] = minute
            for i in range(len(counts)):
                counts[i] = 0
        counts[index] += 1
        self._totals[index] += 1

    def totals(self) -> dict[str, int]:
        """Requests by cache result since start."""
        return dict(zip(RESULTS, self._totals, strict=True))

    def minutes(self) -> list[Minute]:
        """The last MINUTES minutes, oldest first, the current one last
        (partly elapsed); minutes without requests have zero counts."""
        now = int(self._clock() // BUCKET_SECONDS)
        result = []
        for minute in range(now - MINUTES + 1, now + 1):
            slot = minute % MINUTES
            counts = self._counts[slot] if self._minute[slot] == minute else None
            result.append(
                Minute(
                    float(minute * BUCKET_SECONDS),
                    dict(zip(RESULTS, counts or [0] * len(RESULTS), strict=True)),
                )
            )
        return result


class TopRepositories:
    """Pull counts by (registry, repository), bounded to `max_keys` keys."""

    def __init__(self, max_keys: int = TOP_KEYS) -> None:
        if max_keys < 2:
            raise ValueError("max_keys must be at least 2")
        self.max_keys = max_keys
        self._counts: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, registry: str, repository: str) -> None:
        key = (registry, repository)
        count = self._counts.get(key)
        if count is not None:
            self._counts[key] = count + 1
            return
        if len(self._counts) >= self.max_keys:
            self._trim()
        self._counts[key] = 1

    def top(self, n: int = 10) -> list[tuple[str, str, int]]:
        """The `n` most pulled, most first; ties by name."""
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(r, name, count) for (r, name), count in ranked[:n]]

    def _trim(self) -> None:
        """Keep the most pulled half. Among equal counts the later added
        stay (dicts keep insertion order and the sort is stable), so a burst
        of new names does not freeze the table with old ones."""
        items = list(self._counts.items())
        items.reverse()  # newest first, so a stable sort keeps them ahead
        items.sort(key=lambda kv: kv[1], reverse=True)
        kept = items[: self.max_keys // 2]
        kept.reverse()  # back to oldest first
        self._counts = dict(kept)


@dataclass(frozen=True, slots=True)
class EvictionPass:
    time: float  # unix seconds, when the pass ended
    blobs: int
    bytes: int
    size_after: int


class Stats:
    """What the status page shows beyond the metrics: see the module doc.

    `clock` is wall time (unix seconds); `started` is when this was made,
    at app creation.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        top_keys: int = TOP_KEYS,
        evictions_kept: int = EVICTIONS_KEPT,
    ) -> None:
        self.clock = clock
        self.started = clock()
        self.requests = RequestHistory(clock)
        self.repositories = TopRepositories(top_keys)
        self._evictions: collections.deque[EvictionPass] = collections.deque(
            maxlen=evictions_kept
        )

    def answered(self, result: str | None) -> None:
        """A request was answered with this cache result (None: no lookup)."""
        self.requests.record(result)

    def pulled(self, registry: str, repository: str) -> None:
        """A manifest was served to a GET for this repository."""
        self.repositories.add(registry, repository)

    def evicted(self, blobs: int, freed: int, size_after: int) -> None:
        """An eviction pass removed `blobs` blobs, `freed` bytes."""
        self._evictions.append(EvictionPass(self.clock(), blobs, freed, size_after))

    def evictions(self) -> list[EvictionPass]:
        """The last passes that removed something, newest first."""
        return list(reversed(self._evictions))
