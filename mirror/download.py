"""BlobDownload: one upstream fetch of one blob, shared by all its readers.

The fetch task appends upstream bytes to a temp file and publishes how many
are there; every reader (a client response) `pread`s from a shared
read-only fd from its own offset, so a reader that joins late starts at byte
0, then follows live. The fd stays valid when the file is renamed into the
store or unlinked, so readers never race the commit.

Guarantees:

* Verified before complete: the last byte is published only after the
  digest matched, so no reader can finish a full response with wrong bytes.
  On any failure every reader gets the error, and the HTTP layer cuts its
  response short of the declared length.
* A cut body is resumed with a Range request, up to `resume_attempts` times;
  the final digest check covers every byte.
* Not every blob can be cached: one larger than the cache's whole budget, or
  one whose write hits a full disk (ENOSPC), is streamed through without
  being cached. Bytes that are not on disk are kept in a bounded memory
  buffer; the fetch waits for the slowest reader rather than buffer more.
  Such a download takes no new readers (they start their own), and the temp
  file is removed at once, so nothing partial is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor
from mirror.cache.metadata import MetadataStore
from mirror.errors import DigestMismatch, MirrorError, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.upstream.client import BlobResponse

log = logging.getLogger(__name__)

# Upper bound of one read for one client, and of one write batch.
READ_CHUNK = 1024 * 1024
# Bytes an uncacheable download may hold in memory ahead of its slowest reader.
MEMORY_WINDOW = 8 * 1024 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

Hasher = Any  # hashlib's hash objects have no public type


class BlobFetcher(Protocol):
    def blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobResponse]: ...


@dataclass(frozen=True)
class DownloadContext:
    """What every download needs; built once by the cache."""

    upstream: BlobFetcher
    blobs: BlobStore
    metadata: MetadataStore
    metrics: Metrics
    evictor: Evictor
    resume_attempts: int
    clock: Callable[[], float] = time.time
    # How long an uncached download waits for its slowest reader before
    # dropping it, so one stalled client cannot stall the others.
    reader_timeout: float = 60.0


class BlobDownload:
    """Create, `start()`, `acquire()` per reader; see the module docstring."""

    def __init__(
        self,
        repository: str,
        digest: Digest,
        context: DownloadContext,
        on_detach: Callable[[BlobDownload], None],
    ) -> None:
        self.repository = repository
        self.digest = digest
        self._ctx = context
        # Called once no new reader may join: when it ends, or turns uncached.
        self._on_detach = on_detach
        self.size: int | None = None
        self.written = 0  # bytes received, hashed and published or held
        self.verified = False
        self.cached = True  # False once it streams through uncached
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._changed = asyncio.Event()
        self._consumed = asyncio.Event()
        self._fd: int | None = None
        self._refs = 1  # the fetch task's own reference
        # Bytes from here on are not on disk, only in _memory.
        self._disk_end: int | None = None
        self._memory: collections.deque[tuple[int, bytes]] = collections.deque()
        self._memory_bytes = 0
        self._readers: dict[int, int] = {}  # reader id -> its next offset
        self._dropped: set[int] = set()  # readers too slow to wait for
        self._reader_ids = itertools.count()
        # The newest batch, so readers that are caught up need no pread.
        self._recent_offset = 0
        self._recent = b""

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"download {self.digest}")

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def acquire(self) -> None:
        self._refs += 1

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def wait_started(self) -> None:
        """Wait until a first byte may be sent, or the blob is complete.

        Nothing is promised to a client before that, so a download failing
        on its first read (or a zero-length body for a non-empty digest)
        becomes a clean error status rather than a cut response.

        Raises the download's error if it failed.
        """
        await self._started.wait()
        if self.error is not None:
            raise self.error

    # --- readers ----------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _readable(self) -> int:
        """How many bytes readers may send now."""
        if self.verified:
            return self.written
        if self.size is not None and self.written < self.size:
            return self.written
        # The final byte waits for verification (or the size is unknown and
        # any byte could be the last one).
        return max(0, self.written - 1)

    async def stream(
        self, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes from `start` as they become available.

        With `end` (exclusive) this is a range, sent as soon as its bytes are
        in. Without it, the stream runs to the end of the blob and ends only
        after the digest was verified.

        Raises the download's error (UpstreamError, DigestMismatch, ...) if it
        fails before the stream is complete.
        """
        reader = next(self._reader_ids)
        offset = self._readers[reader] = start
        self._signal_consumed()  # a reader arrived: _hold() may trim now
        try:
            while True:
                if reader in self._dropped:
                    raise UpstreamUnavailable("client too slow for an uncached blob")
                limit = self._readable() if end is None else min(end, self._readable())
                if offset < limit:
                    data = await self._read(offset, min(limit - offset, READ_CHUNK))
                    offset += len(data)
                    if reader in self._readers:  # not dropped meanwhile
                        self._readers[reader] = offset
                    self._signal_consumed()
                    yield data
                    continue
                if end is not None and offset >= end:
                    return
                if end is None and self.verified and offset >= self.written:
                    return
                if self.error is not None:
                    raise self.error
                await self._changed.wait()
        finally:
            self._readers.pop(reader, None)
            self._dropped.discard(reader)
            self._signal_consumed()

    def _signal_consumed(self) -> None:
        consumed, self._consumed = self._consumed, asyncio.Event()
        consumed.set()

    async def _read(self, offset: int, length: int) -> bytes:
        recent_end = self._recent_offset + len(self._recent)
        if self._recent_offset <= offset < recent_end:
            start = offset - self._recent_offset
            return self._recent[start : start + length]
        if self._disk_end is not None and offset >= self._disk_end:
            return self._from_memory(offset, length)
        if self._fd is None:
            raise UpstreamUnavailable("download lost its file")
        if self._disk_end is not None:
            length = min(length, self._disk_end - offset)
        return await asyncio.to_thread(os.pread, self._fd, length, offset)

    def _from_memory(self, offset: int, length: int) -> bytes:
        for start, data in self._memory:
            if start <= offset < start + len(data):
                return data[offset - start : offset - start + length]
        # Only possible for a reader the window was trimmed past, which the
        # backpressure in _hold() prevents for attached readers.
        raise UpstreamUnavailable("reader fell behind an uncached download")

    # --- the fetch task -----------------------------------------------------------

    async def _run(self) -> None:
        ctx = self._ctx
        temp = ctx.blobs.temp_path()
        ctx.metrics.downloads_in_progress.inc()
        write_fd: int | None = None
        try:
            write_fd = await asyncio.to_thread(
                os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
            self._fd = await asyncio.to_thread(os.open, temp, os.O_RDONLY)
            hasher = self.digest.hasher()
            await self._fetch_resuming(write_fd, hasher, temp)
            actual = Digest(self.digest.algorithm, hasher.hexdigest())
            if actual != self.digest:
                raise DigestMismatch(str(self.digest), str(actual))
            await asyncio.to_thread(os.close, write_fd)
            write_fd = None
            if self.cached:
                await self._commit(temp)
            self.verified = True
            log.info(
                "%s blob %s (%d bytes) for %s",
                "cached" if self.cached else "streamed uncached",
                self.digest,
                self.written,
                self.repository,
            )
        except BaseException as exc:
            self.error = _as_domain_error(exc)
            # From now on a new request must start afresh, not join a failure;
            # the readers attached hear of it now, not after the cleanup.
            self._on_detach(self)
            self._started.set()
            self._notify()
            if isinstance(exc, DigestMismatch | _BodyCut):
                ctx.metrics.verification_failures.labels("blob").inc()
            log.warning(
                "download of blob %s for %s failed after %d bytes: %s",
                self.digest,
                self.repository,
                self.written,
                self.error,
            )
            if write_fd is not None:
                os.close(write_fd)
            await asyncio.shield(ctx.blobs.discard(temp))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            ctx.metrics.downloads_in_progress.dec()
            self._on_detach(self)
            self._started.set()
            self._notify()
            self.release()

    async def _commit(self, temp: Path) -> None:
        """Move the verified file into the store and record it.

        A full disk or database here costs the cache entry, not the clients:
        the bytes are verified and are served either way.
        """
        ctx = self._ctx
        try:
            await ctx.blobs.commit(temp, self.digest)
            try:
                await ctx.metadata.add_blob(str(self.digest), self.written, ctx.clock())
            except sqlite3.Error:
                await ctx.blobs.delete(self.digest)  # no file without a row
                raise
        except (OSError, sqlite3.Error) as exc:
            self.cached = False
            await ctx.blobs.discard(temp)
            reason = "disk_full" if _is_disk_full(exc) else "store_error"
            ctx.metrics.uncached_downloads.labels(reason).inc()
            log.error("could not cache blob %s: %s", self.digest, exc)
            return
        ctx.evictor.added(self.written)

    async def _fetch_resuming(self, fd: int, hasher: Hasher, temp: Path) -> None:
        resumes = 0
        while True:
            try:
                await self._fetch(fd, hasher, temp)
                return
            except _BodyCut as cut:
                if resumes >= self._ctx.resume_attempts:
                    raise
                resumes += 1
                self._ctx.metrics.blob_resumes.inc()
                log.info(
                    "upstream cut blob %s at byte %d of %s (%s); resuming (%d/%d)",
                    self.digest,
                    self.written,
                    self.size,
                    cut.detail,
                    resumes,
                    self._ctx.resume_attempts,
                )

    async def _fetch(self, fd: int, hasher: Hasher, temp: Path) -> None:
        """One upstream request, from byte `written` on.

        Raises _BodyCut if the body ends early (resumable), UpstreamError if
        upstream refuses, DigestMismatch if the body is longer than declared
        or upstream changed its size.
        """
        async with self._ctx.upstream.blob(
            self.repository, str(self.digest), offset=self.written
        ) as resp:
            if self.size is None:
                self.size = resp.size
                if self.size is not None and self.size > self._ctx.evictor.max_size:
                    await self._go_uncached("too_large", temp)
            elif resp.size is not None and resp.size != self.size:
                raise DigestMismatch(
                    str(self.digest), f"size changed from {self.size} to {resp.size}"
                )
            # A 200 to a Range request restarts at 0: skip what we have.
            await self._copy(resp.content, fd, hasher, temp, self.written - resp.offset)
        if self.size is not None and self.written < self.size:
            raise _BodyCut(
                "upstream blob body cut short",
                {"received": self.written, "expected": self.size},
            )

    async def _copy(
        self,
        content: aiohttp.StreamReader,
        fd: int,
        hasher: Hasher,
        temp: Path,
        skip: int,
    ) -> None:
        """Hash and append the body, publishing progress as it goes.

        Raises _BodyCut if reading fails, DigestMismatch if the body runs
        past the declared size.
        """
        received = self._ctx.metrics.upstream_bytes.labels("blob")
        try:
            while True:
                data = await content.readany()
                if not data:
                    return
                parts = [data]
                # Take what else is already buffered, to write in one call.
                while sum(map(len, parts)) < READ_CHUNK and (
                    more := content.read_nowait()
                ):
                    parts.append(more)
                batch = b"".join(parts) if len(parts) > 1 else data
                received.inc(len(batch))
                if skip:
                    batch, skip = batch[skip:], max(0, skip - len(batch))
                    if not batch:
                        continue
                await self._store(batch, fd, hasher, temp)
                self._recent_offset, self._recent = self.written, batch
                self.written += len(batch)
                if self.size is not None and self.written > self.size:
                    raise DigestMismatch(str(self.digest), "body longer than declared")
                if self._readable() > 0:
                    self._started.set()
                self._notify()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _BodyCut(
                "upstream blob body cut short",
                {"received": self.written, "error": str(exc) or type(exc).__name__},
            ) from exc

    async def _store(self, batch: bytes, fd: int, hasher: Hasher, temp: Path) -> None:
        """Hash `batch` and put it on disk, or in memory once uncached."""
        if self._disk_end is None:
            try:
                await asyncio.to_thread(_hash_and_write, hasher, fd, batch)
                return
            except OSError as exc:
                if not _is_disk_full(exc):
                    raise
                # The batch is hashed; how much of it reached the disk is
                # unknown, so it is kept in memory from its first byte.
                await self._go_uncached("disk_full", temp)
        else:
            await asyncio.to_thread(hasher.update, batch)
        await self._hold(batch)

    async def _hold(self, batch: bytes) -> None:
        """Keep a batch in memory; wait while the readers lag too far behind."""
        self._memory.append((self.written, batch))
        self._memory_bytes += len(batch)
        while self._memory_bytes > MEMORY_WINDOW:
            if not self._readers and (self._refs <= 1 or self._dropped):
                raise UpstreamUnavailable("no client is reading an uncached download")
            slowest = min(self._readers.values(), default=0)
            while self._memory and _end(self._memory[0]) <= slowest:
                _, dropped = self._memory.popleft()
                self._memory_bytes -= len(dropped)
            if self._memory_bytes > MEMORY_WINDOW:
                try:
                    async with asyncio.timeout(self._ctx.reader_timeout):
                        await self._consumed.wait()
                except TimeoutError:
                    self._drop_readers_at(slowest)

    def _drop_readers_at(self, offset: int) -> None:
        """Give up on the readers stuck at `offset`; the others go on."""
        stuck = [r for r, at in self._readers.items() if at == offset]
        for reader in stuck:
            del self._readers[reader]
            self._dropped.add(reader)
        log.warning(
            "dropped %d client(s) stalled at byte %d of uncached blob %s",
            len(stuck),
            offset,
            self.digest,
        )

    async def _go_uncached(self, reason: str, temp: Path) -> None:
        """Stop caching: bytes from `written` on stay in memory only."""
        self.cached = False
        self._disk_end = self.written
        self._ctx.metrics.uncached_downloads.labels(reason).inc()
        log.warning(
            "blob %s for %s is streamed without caching (%s, %s bytes)",
            self.digest,
            self.repository,
            reason,
            self.size,
        )
        self._on_detach(self)  # new readers start their own download
        # Free the disk now; readers keep reading the prefix through the fd.
        await self._ctx.blobs.discard(temp)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return "full" in str(exc)  # sqlite3: "database or disk is full"


def _end(batch: tuple[int, bytes]) -> int:
    return batch[0] + len(batch[1])


def _hash_and_write(hasher: Hasher, fd: int, data: bytes) -> None:
    # hashlib and os.write release the GIL: this runs beside the event loop.
    hasher.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _BodyCut(UpstreamUnavailable):
    """Upstream's blob body ended early: worth resuming with a Range."""


def _as_domain_error(exc: BaseException) -> BaseException:
    """What readers of a failed download are told."""
    if isinstance(exc, MirrorError | asyncio.CancelledError):
        return exc
    if isinstance(exc, OSError):
        return UpstreamUnavailable(
            "mirror could not store the blob", {"error": str(exc)}
        )
    return exc
