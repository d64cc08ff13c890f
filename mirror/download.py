"""BlobDownload: one upstream fetch of one blob, shared by all its readers.

The fetch task hashes upstream bytes as they arrive and keeps them in a
bounded memory window; a writer task appends them to a temp file behind it,
so clients get bytes at network speed even when the disk is slower. Every
reader (a client response) starts at its own offset — byte 0 for one that
joins late — and gets what is already on disk as a `FileSpan` of a shared
read-only file, which the HTTP layer sends with `sendfile` (no byte through
Python; over TLS, or when asked, it is read with `pread` instead), then what
is still only in memory, then follows live. The file stays valid when it is
renamed into the store or unlinked, so readers never race the commit.

Guarantees:

* Verified before complete: the last byte is published only after the
  digest matched, so no reader can finish a full response with wrong bytes.
  On any failure every reader gets the error, and the HTTP layer cuts its
  response short of the declared length.
* A cut body is resumed with a Range request, up to `resume_attempts` times,
  as long as each attempt brought bytes (a stalled upstream is not asked
  again); the final digest check covers every byte.
* Memory is bounded: the window holds at most `WINDOW` bytes per download,
  and all windows together `upstream.download_memory` (MemoryBudget), each
  download always allowed `MIN_WINDOW`; when the disk (or, uncached, the
  slowest reader) falls that far behind, the fetch waits for it.
* Downloads are bounded: at most `upstream.max_downloads` run at once (plus
  a small lane for small blobs, see DownloadSlots); the rest wait in a FIFO
  queue, and one whose every reader left while it waited is dropped without
  asking upstream.
* A download reserves its size in the cache budget while it runs (a blob of
  unknown length reserves what it has received so far), so eviction makes
  room ahead of it.
* Not every blob can be cached: one larger than the cache's whole budget
  (known from Content-Length, or found out as an unknown-length body grows
  past it), or one whose write hits a full disk (ENOSPC), is streamed
  through without being cached. Then the window is trimmed by the slowest
  reader instead of by the writer, and a reader stalled longer than
  `reader_timeout` is dropped. Such a download takes no new readers (they
  start their own), and the temp file is removed at once, so nothing
  partial is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import aiohttp

from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor
from mirror.cache.metadata import MetadataStore
from mirror.errors import (
    DigestMismatch,
    MirrorError,
    UpstreamDown,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.registry import Registry

log = logging.getLogger(__name__)

# Upper bound of one read for one client, and of one batch from upstream.
READ_CHUNK = 1024 * 1024
# Upper bound of one piece from memory to one client: what the socket does
# not take at once is copied into the connection's buffer, so this bounds
# that copy per client.
SEND_CHUNK = 256 * 1024
# Upper bound of one FileSpan (the handler sends it in pieces of its own).
SPAN_LIMIT = 64 * 1024 * 1024
# Bytes one download may hold in memory ahead of its disk writes (or, when
# uncached, of its slowest reader)...
WINDOW = 32 * 1024 * 1024
# ...and may always hold, whatever the others hold (so each goes on).
MIN_WINDOW = READ_CHUNK
# upstream.download_memory's default: what all windows together may hold.
DOWNLOAD_MEMORY = 64 * 1024 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Blobs up to this size (as a cached manifest declares it) use the small lane.
SMALL_BLOB = 1024 * 1024

Hasher = Any  # hashlib's hash objects have no public type


class DownloadSlots:
    """At most `limit` downloads fetch at once; the others queue, in order.

    Small blobs (at most `SMALL_BLOB` bytes by the size a cached manifest
    declares: image configs, small layers) have a lane of their own,
    `small_limit` more slots, so a pull can fetch its config, and start,
    while big layers queue. The queue length and each wait are exported as
    metrics, so an operator sees when `upstream.max_downloads` is what pulls
    are waiting for.
    """

    def __init__(self, limit: int, metrics: Metrics, small_limit: int = 0) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._small = asyncio.Semaphore(small_limit) if small_limit else None
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def slot(self, size_hint: int | None = None) -> AsyncIterator[None]:
        small = size_hint is not None and size_hint <= SMALL_BLOB
        semaphore = self._small if small and self._small else self._semaphore
        started = time.monotonic()
        self._metrics.downloads_queued.inc()
        try:
            await semaphore.acquire()
        finally:
            self._metrics.downloads_queued.dec()
        self._metrics.download_queue_wait.observe(time.monotonic() - started)
        try:
            yield
        finally:
            semaphore.release()


class MemoryBudget:
    """Blob bytes all downloads together hold in memory, against
    `upstream.download_memory`; exported as a gauge."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.held = 0
        metrics.download_memory.set_function(lambda: self.held)

    def take(self, size: int) -> None:
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size

    @property
    def spent(self) -> bool:
        return self.held > self.limit


@dataclass(frozen=True)
class DownloadContext:
    """What every download needs, whichever registry it fetches from; built
    once by the cache."""

    blobs: BlobStore
    metadata: MetadataStore
    metrics: Metrics
    evictor: Evictor
    slots: DownloadSlots
    memory: MemoryBudget
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class FileSpan:
    """`count` bytes of a download at `offset` of its temp file, verified
    or not yet (the last byte is never in a span before verification), to be
    sent with `sendfile`. The file is shared: use explicit offsets, never
    its position."""

    file: FileIO
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


Chunk = bytes | memoryview | FileSpan


class BlobDownload:
    """Create, `start()`, `acquire()` per reader; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        repository: str,
        digest: Digest,
        context: DownloadContext,
        on_detach: Callable[[BlobDownload], None],
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self._ctx = context
        # Called once no new reader may join: when it ends, or turns uncached.
        self._on_detach = on_detach
        self.size: int | None = None
        self.received = 0  # bytes received and hashed
        self.on_disk = 0  # bytes written to the temp file, a prefix
        self.verified = False
        self.cached = True  # False once it streams through uncached
        self.queued = True  # waiting for a download slot
        self._reserved = 0  # bytes of the cache budget held for this blob
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._changed = asyncio.Event()  # set on new bytes or a new state
        self._drained = asyncio.Event()  # set when the window shrank
        self._file: FileIO | None = None  # read-only, shared by readers
        self._write_fd: _WriteFd | None = None
        self._refs = 1  # the fetch task's own reference
        # [offset, bytes) batches not on disk (or, uncached, not yet read by all).
        self._memory: collections.deque[tuple[int, bytes]] = collections.deque()
        self._memory_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._readers: dict[int, int] = {}  # reader id -> its next offset
        self._dropped: set[int] = set()  # readers too slow to wait for
        self._reader_ids = itertools.count()

    @property
    def source(self) -> tuple[str, str]:
        """Where it fetches from: the registry's name and the repository."""
        return (self.registry.name, self.repository)

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name=f"download {self.digest}")
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def attach(self) -> Reader:
        """A new reader, counted from byte 0 until it starts streaming, so an
        uncached window is not trimmed past it before it reads. The caller
        must `close()` it."""
        self._refs += 1
        reader = next(self._reader_ids)
        self._readers[reader] = 0
        return Reader(self, reader)

    def _detach_reader(self, reader: int) -> None:
        self._readers.pop(reader, None)
        self._dropped.discard(reader)
        if not self.cached:
            self._trim_read()
        self._signal_drained()
        self.release()
        if self.queued and self._refs == 1:
            # Nobody waits for it any more: give the slot to someone who does.
            self.cancel()

    def release(self) -> None:
        self._refs -= 1
        if self._refs:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        # Nobody reads the window any more (a failure, or readers that left).
        self._memory.clear()
        self._let_go(self._memory_bytes)

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

    def _signal_drained(self) -> None:
        drained, self._drained = self._drained, asyncio.Event()
        drained.set()

    def _readable(self) -> int:
        """How many bytes readers may send now."""
        if self.verified:
            return self.received
        if self.size is not None and self.received < self.size:
            return self.received
        # The final byte waits for verification (or the size is unknown and
        # any byte could be the last one).
        return max(0, self.received - 1)

    async def _stream(
        self, reader: int, start: int, end: int | None, spans: bool
    ) -> AsyncIterator[Chunk]:
        """See Reader.stream."""
        offset = start
        if reader in self._readers:
            self._readers[reader] = start
        while True:
            if reader in self._dropped:
                raise UpstreamUnavailable("client too slow for an uncached blob")
            limit = self._readable() if end is None else min(end, self._readable())
            if offset < limit:
                data: Chunk | None = self._in_memory(
                    offset, min(limit - offset, SEND_CHUNK)
                )
                if data is None and spans:
                    data = self._span(offset, limit)
                if data is None:
                    data = await self._pread(offset, min(limit - offset, READ_CHUNK))
                offset += len(data)
                if reader in self._readers:  # not dropped meanwhile
                    self._readers[reader] = offset
                if not self.cached:
                    self._trim_read()
                yield data
                continue
            if end is not None and offset >= end:
                return
            if end is None and self.verified and offset >= self.received:
                return
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    def _in_memory(self, offset: int, length: int) -> bytes | memoryview | None:
        """Up to `length` bytes at `offset` if the window holds them.

        Memory is checked first and in the same event-loop step as the disk
        bound (`_span`, `_pread`), so a batch the writer drops meanwhile is
        always on disk.
        """
        for start, data in reversed(self._memory):  # readers are mostly near the end
            if start <= offset < start + len(data):
                at = offset - start
                if at == 0 and length >= len(data):
                    return data  # the whole batch: no copy
                return memoryview(data)[at : at + length]
        return None

    def _on_disk(self, offset: int) -> FileIO:
        """The file to read `offset` from; it is there, not in memory."""
        if offset >= self.on_disk:
            # Only for a reader the uncached window was trimmed past, which
            # the reader-paced trimming prevents for attached readers.
            raise UpstreamUnavailable("reader fell behind an uncached download")
        if self._file is None:
            raise UpstreamUnavailable("download lost its file")
        return self._file

    def _span(self, offset: int, limit: int) -> FileSpan:
        """What of [offset, limit) is on disk, as one span."""
        file = self._on_disk(offset)
        count = min(limit, self.on_disk, offset + SPAN_LIMIT) - offset
        return FileSpan(file, offset, count)

    async def _pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`, read from disk."""
        file = self._on_disk(offset)
        length = min(length, self.on_disk - offset)
        return await asyncio.to_thread(os.pread, file.fileno(), length, offset)

    # --- the fetch task -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with self._ctx.slots.slot(await self._size_hint()):
                self.queued = False
                await self._download()
        except asyncio.CancelledError:
            if not self.queued:
                raise
            # Every reader left while it waited: nothing was asked upstream.
            self._announce_failure(
                UpstreamUnavailable("download abandoned by its clients")
            )
            self.release()
            log.debug("queued download of %s dropped: no client left", self.digest)

    def _announce_failure(self, error: BaseException) -> None:
        """Record the download's error and wake every reader to it; from now
        on a new request starts afresh rather than joining a failure."""
        self.error = error
        self._on_detach(self)
        self._started.set()
        self._notify()

    async def _size_hint(self) -> int | None:
        """The size a cached manifest declares for this blob (None if none
        does, or the database cannot say): it picks the download lane."""
        try:
            return await self._ctx.metadata.declared_size(str(self.digest))
        except sqlite3.Error:
            return None

    async def _download(self) -> None:
        ctx = self._ctx
        temp = ctx.blobs.temp_path()
        ctx.metrics.downloads_in_progress.inc()
        try:
            self._write_fd = _WriteFd(
                await asyncio.to_thread(
                    os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
                )
            )
            self._file = await asyncio.to_thread(FileIO, temp, "rb")
            self._writer = asyncio.create_task(self._write_behind(temp))
            hasher = self.digest.hasher()
            await self._fetch_resuming(hasher, temp)
            actual = Digest(self.digest.algorithm, hasher.hexdigest())
            if actual != self.digest:
                raise DigestMismatch(str(self.digest), str(actual))
            # Verified: readers may finish now; caching it is our business.
            self.verified = True
            self._notify()
            await self._writer  # the rest of the window goes to disk
            if self.cached:
                await self._commit(temp)
            log.info(
                "%s blob %s (%d bytes) for %s/%s",
                "cached" if self.cached else "streamed uncached",
                self.digest,
                self.received,
                self.registry.name,
                self.repository,
            )
        except BaseException as exc:
            # The readers attached hear of it now, not after the cleanup.
            self._announce_failure(_as_domain_error(exc))
            if isinstance(exc, DigestMismatch | _BodyCut):
                self.registry.metrics.verification_failures.labels("blob").inc()
            # While upstream is marked down every miss fails at once; the
            # client logged that once, so one line per download is noise.
            log.log(
                logging.DEBUG
                if isinstance(self.error, UpstreamDown)
                else logging.WARNING,
                "download of blob %s for %s/%s failed after %d bytes: %s",
                self.digest,
                self.registry.name,
                self.repository,
                self.received,
                self.error,
            )
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            await asyncio.shield(ctx.blobs.discard(temp))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._unreserve()
            if self._write_fd is not None:
                # Not under a write still running in its thread (the writer
                # task was cancelled, the thread was not): it closes it then.
                self._write_fd.close()
                self._write_fd = None
            ctx.metrics.downloads_in_progress.dec()
            self._on_detach(self)
            self._started.set()
            self._notify()
            self.release()

    async def _write_behind(self, temp: Path) -> None:
        """Append the window to the temp file, oldest batch first, until the
        body is complete and on disk, or the download goes uncached.

        A write error (a full disk, or worse) costs the cache entry, not the
        clients: the download goes on uncached.
        """
        while self.cached:
            if not self._memory:
                if self.verified:  # the whole body is in, and all written
                    return
                await self._changed.wait()
                continue
            offset, data = self._memory[0]
            try:
                await asyncio.to_thread(_write_to, self._write_fd, data)
            except OSError as exc:
                disk_full = _is_disk_full(exc)
                if not disk_full:
                    log.error("writing blob %s failed: %s", self.digest, exc)
                await self._go_uncached(
                    "disk_full" if disk_full else "store_error", temp
                )
                return
            # Written: readers find these bytes on disk from now on.
            self.on_disk = offset + len(data)
            self._memory.popleft()
            self._let_go(len(data))
            self._signal_drained()

    def _trim_read(self) -> None:
        """Uncached: drop batches every attached reader has passed."""
        if not self._readers:
            return
        slowest = min(self._readers.values())
        while self._memory and _end(self._memory[0]) <= slowest:
            _, data = self._memory.popleft()
            self._let_go(len(data))
            self._signal_drained()

    def _hold(self, batch: bytes) -> None:
        """Keep `batch`, the bytes after `received`, in the window."""
        self._memory.append((self.received, batch))
        self._memory_bytes += len(batch)
        self._ctx.memory.take(len(batch))

    def _let_go(self, size: int) -> None:
        self._memory_bytes -= size
        self._ctx.memory.give(size)

    def _over_window(self) -> bool:
        """Whether the fetch must wait before it reads more."""
        if self._memory_bytes > WINDOW:
            return True
        return self._memory_bytes > MIN_WINDOW and self._ctx.memory.spent

    async def _commit(self, temp: Path) -> None:
        """Move the verified file into the store and record it.

        A full disk or database here costs the cache entry, not the clients:
        the bytes are verified and are served either way.
        """
        ctx = self._ctx
        try:
            if self._write_fd is not None:
                await asyncio.to_thread(self._write_fd.close)
                self._write_fd = None
            await ctx.blobs.commit(temp, self.digest)
            try:
                await ctx.metadata.add_blob(
                    str(self.digest), self.received, ctx.clock()
                )
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
        self._unreserve()
        ctx.evictor.added(self.received)

    def _reserve(self, size: int) -> None:
        """Hold `size` more bytes of the cache budget for this blob."""
        self._reserved += size
        self._ctx.evictor.reserve(size)

    def _unreserve(self) -> None:
        if self._reserved:
            self._ctx.evictor.reserve(-self._reserved)
            self._reserved = 0

    async def _fetch_resuming(self, hasher: Hasher, temp: Path) -> None:
        resumes = 0
        while True:
            before = self.received
            try:
                await self._fetch(hasher, temp)
                return
            except _BodyCut as cut:
                # An attempt that brought nothing (a stalled upstream, each
                # time after read_timeout) is not worth another: it would hold
                # a download slot for (1 + resume_attempts) * read_timeout.
                attempts = self.registry.resume_attempts
                if resumes >= attempts or self.received == before:
                    raise
                resumes += 1
                self.registry.metrics.blob_resumes.inc()
                log.info(
                    "upstream cut blob %s at byte %d of %s (%s); resuming (%d/%d)",
                    self.digest,
                    self.received,
                    self.size,
                    cut.detail,
                    resumes,
                    attempts,
                )

    async def _fetch(self, hasher: Hasher, temp: Path) -> None:
        """One upstream request, from byte `received` on.

        Raises _BodyCut if the body ends early (resumable), UpstreamError if
        upstream refuses, DigestMismatch if the body is longer than declared
        or upstream changed its size.
        """
        async with self.registry.upstream.blob(
            self.repository, str(self.digest), offset=self.received
        ) as resp:
            if self.size is None:
                self.size = resp.size
                if self.size is not None and self.size > self._ctx.evictor.max_size:
                    await self._go_uncached("too_large", temp)
                elif self.size is not None:
                    self._reserve(self.size)
            elif resp.size is not None and resp.size != self.size:
                raise DigestMismatch(
                    str(self.digest), f"size changed from {self.size} to {resp.size}"
                )
            # A 200 to a Range request restarts at 0: skip what we have.
            await self._copy(resp.content, hasher, self.received - resp.offset, temp)
        if self.size is not None and self.received < self.size:
            raise _BodyCut(
                "upstream blob body cut short",
                {"received": self.received, "expected": self.size},
            )

    async def _copy(
        self, content: aiohttp.StreamReader, hasher: Hasher, skip: int, temp: Path
    ) -> None:
        """Hash the body into the window, publishing progress as it goes.

        Raises _BodyCut if reading fails, DigestMismatch if the body runs
        past the declared size.
        """
        received = self.registry.metrics.bytes.labels("blob")
        try:
            while True:
                data = await content.readany()
                if not data:
                    return
                parts = [data]
                # Take what else is already buffered, to hash in one call;
                # a batch stays within READ_CHUNK (= MIN_WINDOW), so the one
                # batch readers cannot finish (its last byte waits for the
                # digest) never keeps a download over its window.
                total = len(data)
                while total < READ_CHUNK and (
                    more := content.read_nowait(READ_CHUNK - total)
                ):
                    parts.append(more)
                    total += len(more)
                batch = b"".join(parts) if len(parts) > 1 else data
                received.inc(len(batch))
                if skip:
                    batch, skip = batch[skip:], max(0, skip - len(batch))
                    if not batch:
                        continue
                # hashlib releases the GIL: this runs beside the event loop.
                await asyncio.to_thread(hasher.update, batch)
                self._hold(batch)
                self.received += len(batch)
                if self.size is not None and self.received > self.size:
                    raise DigestMismatch(str(self.digest), "body longer than declared")
                if self.size is None and self.cached:
                    # Unknown length: the budget is taken as the body grows.
                    self._reserve(len(batch))
                    if self.received > self._ctx.evictor.max_size:
                        await self._go_uncached("too_large", temp)
                if self._readable() > 0:
                    self._started.set()
                self._notify()
                await self._within_window()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _BodyCut(
                "upstream blob body cut short",
                {"received": self.received, "error": str(exc) or type(exc).__name__},
            ) from exc

    async def _within_window(self) -> None:
        """Wait while the window is full (`_over_window`): for the writer, or
        when uncached, for the slowest reader (dropping one stalled too
        long)."""
        while self._over_window():
            if self.cached:
                if self._writer is not None and self._writer.done():
                    self._writer.result()  # raises its error
                    continue  # it went uncached: pace by readers now
                await self._drained.wait()
                continue
            if not self._readers:
                raise UpstreamUnavailable("no client is reading an uncached download")
            self._trim_read()
            slowest = min(self._readers.values())
            if not self._over_window() or slowest >= self._readable():
                # Within the window, or every reader has all it may have:
                # waiting for them would wait for nothing.
                return
            try:
                # How long an uncached download waits for its slowest reader
                # before dropping it, so one stalled client cannot stall the
                # others.
                async with asyncio.timeout(self.registry.read_timeout):
                    await self._drained.wait()
            except TimeoutError:
                # Only a reader that had bytes to read and did not is stalled
                # (another download may have freed the budget meanwhile).
                if self._over_window() and slowest < self._readable():
                    self._drop_readers_at(slowest)

    def _drop_readers_at(self, offset: int) -> None:
        """Give up on the readers stuck at `offset`; the others go on."""
        stuck = [r for r, at in self._readers.items() if at == offset]
        for reader in stuck:
            del self._readers[reader]
            self._dropped.add(reader)
        self._trim_read()
        log.warning(
            "dropped %d client(s) stalled at byte %d of uncached blob %s",
            len(stuck),
            offset,
            self.digest,
        )

    async def _go_uncached(self, reason: str, temp: Path) -> None:
        """Stop caching: what is not on disk stays in memory until read."""
        self.cached = False
        self._ctx.metrics.uncached_downloads.labels(reason).inc()
        log.warning(
            "blob %s for %s/%s is streamed without caching (%s, %s bytes)",
            self.digest,
            self.registry.name,
            self.repository,
            reason,
            self.size,
        )
        self._on_detach(self)  # new readers start their own download
        self._unreserve()
        self._trim_read()
        self._signal_drained()
        # Free the disk now; readers keep reading the prefix through the fd.
        await self._ctx.blobs.discard(temp)


class Reader:
    """One client's view of a download: `stream()` its bytes, then `close()`."""

    def __init__(self, download: BlobDownload, reader: int) -> None:
        self.download = download
        self._id = reader
        self._closed = False

    @property
    def size(self) -> int | None:
        return self.download.size

    @property
    def digest(self) -> Digest:
        return self.download.digest

    def stream(
        self, start: int = 0, end: int | None = None, *, spans: bool = False
    ) -> AsyncIterator[Chunk]:
        """Bytes from `start` as they become available.

        With `end` (exclusive) this is a range, sent as soon as its bytes are
        in. Without it, the stream runs to the end of the blob and ends only
        after the digest was verified. With `spans`, bytes already on disk
        come as FileSpans for sendfile rather than read into memory.

        Raises the download's error (UpstreamError, DigestMismatch, ...) if it
        fails before the stream is complete.
        """
        return self.download._stream(self._id, start, end, spans)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.download._detach_reader(self._id)


class _WriteFd:
    """A download's temp file, open for writing, that is closed only once no
    write is running in a thread.

    Cancelling the writer task does not stop a write already in its thread;
    closing the descriptor under it would let the write land in whatever
    file is opened next with the same number (another blob, the database).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._writing = False
        self._closed = threading.Event()  # set under the lock

    def write(self, data: bytes) -> None:
        """Append `data` (in a worker thread)."""
        with self._lock:
            if self._closed.is_set():
                raise OSError(errno.EBADF, "download's temp file is closed")
            self._writing = True
        try:
            _write_all(self.fd, data)
        finally:
            with self._lock:
                self._writing = False
                if self._closed.is_set():
                    os.close(self.fd)

    def close(self) -> None:
        """Close now, or when the write in flight ends."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self._writing:
                return
        os.close(self.fd)


def _write_to(file: _WriteFd | None, data: bytes) -> None:
    if file is None:
        raise OSError(errno.EBADF, "download's temp file is closed")
    file.write(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return "full" in str(exc)  # sqlite3: "database or disk is full"


def _end(batch: tuple[int, bytes]) -> int:
    return batch[0] + len(batch[1])


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
