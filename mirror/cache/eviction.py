"""Evictor: keeps the blob store within its size budget and the disk's floor.

Least recently used first. A pass starts when the store is over
`max_size`, or the disk has less than `min_free` free; it removes blobs until
the store is at `low_watermark * max_size` and the floor is restored, so that
eviction runs in batches rather than one blob per download. Pinned blobs —
being sent to a client right now — are skipped; a blob being downloaded is
not in the store yet, so it cannot be chosen.

A blob is removed file first, then row: a crash in between leaves a row
without a file, which start-up reconciliation drops cheaply (a file without
a row would have to be re-hashed). Manifests and tags are left alone: a pull
of an image whose layers were evicted fetches them again.

The limits are plain attributes so a config reload can change them live.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mirror.cache.blobs import BlobStore
from mirror.cache.metadata import MetadataStore
from mirror.logutil import human_size
from mirror.metrics import Metrics
from mirror.reference import parse_digest

log = logging.getLogger(__name__)

# Candidates read from the database per round of a pass.
BATCH = 256


class PinSet:
    """Digests in use by readers; the evictor does not remove them."""

    def __init__(self) -> None:
        self._pins: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        self._pins[digest] += 1
        try:
            yield
        finally:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def __contains__(self, digest: object) -> bool:
        return digest in self._pins

    def __len__(self) -> int:
        return len(self._pins)


@dataclass(frozen=True, slots=True)
class PassResult:
    evicted: int
    freed: int
    size_after: int


class Evictor:
    """Size-bounded LRU over BlobStore + MetadataStore. No I/O in __init__."""

    def __init__(
        self,
        metadata: MetadataStore,
        blobs: BlobStore,
        metrics: Metrics,
        pins: PinSet,
        *,
        max_size: int,
        min_free: int,
        low_watermark: float,
        interval: float,
        on_pass: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.metrics = metrics
        self.pins = pins
        self.max_size = max_size
        self.min_free = min_free
        self.low_watermark = low_watermark
        self.interval = interval
        # Told (blobs, bytes freed, size after) of each pass that evicted.
        self.on_pass = on_pass
        self._wakeup = asyncio.Event()
        self._size = 0  # bytes in the store, as of the last pass or addition
        self._reserved = 0  # bytes downloads in progress will add
        self._lock = asyncio.Lock()

    @property
    def size(self) -> int:
        return self._size

    async def load(self) -> None:
        """Read the store's size (start-up, and after outside changes)."""
        count, size = await self.metadata.blob_totals()
        self._set_size(count, size)

    def added(self, size: int) -> None:
        """A blob of `size` bytes entered the store; wake up if over budget."""
        self._size += size
        self.metrics.cache_size.set(self._size)
        self.metrics.cache_blobs.inc()
        if self._size > self.max_size:
            self._wakeup.set()

    def reserve(self, size: int) -> None:
        """Downloads in progress hold `size` more (or, negative, fewer) bytes
        of the budget; eviction makes room for them before they land."""
        self._reserved = max(0, self._reserved + size)
        if size > 0 and self._size + self._reserved > self.max_size:
            self._wakeup.set()

    def trigger(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """The worker: a pass every `interval`, or sooner when woken."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.evict()
            except Exception:
                log.exception("eviction pass failed; will retry")

    async def evict(self) -> PassResult:
        """One pass: bring the store within budget. Returns what it did."""
        async with self._lock:
            await self.load()  # the CLI may have changed the store meanwhile
            # Room for downloads in progress is made now, before they land,
            # but for at most half the budget: with a small cache and many
            # large downloads, making room for all of them would evict the
            # hot set too (the next pass trims what lands past the budget).
            reserved = min(self._reserved, self.max_size // 2)
            # Downloads landing during the pass change self._size; they were
            # counted as reserved, so the pass works from this snapshot.
            size = self._size
            target = size
            if size + reserved > self.max_size:
                target = max(0, int(self.max_size * self.low_watermark) - reserved)
            free = await self._free_bytes()
            need_free = max(0, self.min_free - free)
            if size <= target and need_free == 0:
                return PassResult(0, 0, size)
            evicted, freed = 0, 0
            skipped: set[str] = set()
            while size - freed > target or freed < need_free:
                batch = [
                    (d, n)
                    for d, n in await self.metadata.least_recently_used(
                        BATCH + len(skipped)
                    )
                    if d not in skipped
                ]
                if not batch:
                    break
                victims: list[str] = []
                for digest, blob_size in batch:
                    if digest in self.pins:
                        skipped.add(digest)
                        continue
                    victims.append(digest)
                    freed += blob_size
                    evicted += 1
                    if size - freed <= target and freed >= need_free:
                        break
                if not victims:
                    break  # everything left is in use
                await self._remove(victims)
            self.metrics.evictions.inc(evicted)
            self.metrics.evicted_bytes.inc(freed)
            await self.load()
            if evicted and self.on_pass is not None:
                self.on_pass(evicted, freed, self._size)
            if evicted:
                log.info(
                    "evicted %d blobs (%s); cache now %s of %s",
                    evicted,
                    human_size(freed),
                    human_size(self._size),
                    human_size(self.max_size),
                )
            if self._size > self.max_size:
                log.warning(
                    "cache still over budget (%s of %s): the rest is in use",
                    human_size(self._size),
                    human_size(self.max_size),
                )
            return PassResult(evicted, freed, self._size)

    async def _remove(self, digests: list[str]) -> None:
        # Detach all first, in one event-loop step with the pin checks made
        # by the caller, then pay for the unlinks.
        moved = [self.blobs.detach(parse_digest(d)) for d in digests]
        await self.metadata.delete_blobs(digests)
        for path in moved:
            if path is not None:
                await self.blobs.discard(path)

    async def _free_bytes(self) -> int:
        usage = await asyncio.to_thread(shutil.disk_usage, self.blobs.root)
        return usage.free

    def _set_size(self, count: int, size: int) -> None:
        self._size = size
        self.metrics.cache_size.set(size)
        self.metrics.cache_blobs.set(count)
        self.metrics.cache_max_size.set(self.max_size)
        self.metrics.cache_min_free.set(self.min_free)
