"""PullThroughCache: what to serve from cache, what to fetch, and how.

Policy:

* Content by digest never changes: served from cache when present, otherwise
  fetched once, verified against its digest, cached, served.
* A tag is answered from cache for `tag_ttl` after upstream last confirmed it.
  After that one upstream HEAD (which Docker Hub does not count as a pull)
  revalidates it; the manifest is fetched only if its digest is not cached.
  If upstream fails, the cached digest is served and counted as stale.
* A blob miss starts one `BlobDownload`. Every request for that digest while it
  runs attaches to it: the download streams into a temp file, and each
  attached reader sends the client what is on disk, then follows live. The
  download runs in its own task, so clients leaving do not stop it.

Concurrent work on one key is shared through `SingleFlight` (manifests, tag
revalidations) or the `_downloads` map (blobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cachetools import LRUCache

from mirror.cache.blobs import BlobStore
from mirror.cache.metadata import MetadataStore, TagRecord
from mirror.errors import (
    DigestInvalid,
    DigestMismatch,
    MirrorError,
    UpstreamError,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.singleflight import SingleFlight
from mirror.upstream.client import (
    BlobResponse,
    ManifestInfo,
    Passthrough,
    UpstreamStatus,
)

log = logging.getLogger(__name__)

# Upper bound of one read from a download's temp file for one client.
READ_CHUNK = 1024 * 1024
Hasher = Any  # hashlib's hash objects have no public type
# Bytes of manifests kept in memory for hot tags and digests.
MANIFEST_MEMORY = 64 * 1024 * 1024


class Upstream(Protocol):
    """What the cache needs from upstream (UpstreamClient implements it)."""

    async def head_manifest(self, repository: str, reference: str) -> ManifestInfo: ...

    async def get_manifest(
        self, repository: str, reference: str
    ) -> tuple[ManifestInfo, bytes]: ...

    def blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobResponse]: ...

    async def head_blob(self, repository: str, digest: str) -> int | None: ...

    async def list_tags(
        self, repository: str, params: dict[str, str]
    ) -> Passthrough: ...

    def status(self) -> UpstreamStatus: ...


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    body: bytes | None  # None when only the headers were asked for
    stale: bool = False


@dataclass(frozen=True, slots=True)
class CachedBlob:
    path: Path
    size: int


class PullThroughCache:
    """The cache policy. Constructing it does no I/O."""

    def __init__(
        self,
        metadata: MetadataStore,
        blobs: BlobStore,
        upstream: Upstream,
        metrics: Metrics,
        *,
        tag_ttl: float,
        max_stale: float | None = None,
        resume_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.upstream = upstream
        self.metrics = metrics
        self.tag_ttl = tag_ttl
        self.max_stale = max_stale
        self.resume_attempts = resume_attempts
        self.clock = clock
        self._manifests: LRUCache[str, Manifest] = LRUCache(
            maxsize=MANIFEST_MEMORY, getsizeof=lambda m: m.size or 1
        )
        self._manifest_fetches: SingleFlight[str, Manifest] = SingleFlight()
        self._tag_checks: SingleFlight[tuple[str, str], TagRecord] = SingleFlight()
        self._downloads: dict[Digest, BlobDownload] = {}

    async def close(self) -> None:
        """Stop every download and shared fetch in flight (shutdown)."""
        for download in list(self._downloads.values()):
            download.cancel()
        await asyncio.gather(
            *(d.task for d in self._downloads.values() if d.task),
            return_exceptions=True,
        )
        await self._manifest_fetches.cancel_all()
        await self._tag_checks.cancel_all()

    # --- manifests ------------------------------------------------------------

    async def manifest(
        self, repository: str, reference: str | Digest, *, body: bool = True
    ) -> Manifest:
        """The manifest for a tag or digest; `body=False` for a HEAD.

        Raises ManifestUnknown, DigestMismatch, UpstreamError.
        """
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(repository, reference, body=body)
        record, stale = await self._resolve_tag(repository, reference, body)
        if not body:
            return Manifest(
                record.digest, record.media_type, record.size, None, stale=stale
            )
        manifest = await self._manifest_by_digest(
            repository, parse_digest(record.digest)
        )
        return Manifest(
            manifest.digest, manifest.media_type, manifest.size, manifest.body, stale
        )

    async def _manifest_by_digest(
        self, repository: str, digest: Digest, *, body: bool = True
    ) -> Manifest:
        """Cached, or fetched once and verified; a HEAD miss is only a HEAD."""
        key = str(digest)
        now = self.clock()
        cached = self._manifests.get(key)
        if cached is None:
            record = await self.metadata.get_manifest(key)
            if record is not None:
                cached = Manifest(
                    record.digest, record.media_type, len(record.body), record.body
                )
                self._manifests[key] = cached
        if cached is not None:
            self.metrics.cache_requests.labels("manifest", "hit").inc()
            self.metadata.touch_manifest(key, now)
            return cached
        result = "joined" if self._manifest_fetches.in_flight(key) else "miss"
        self.metrics.cache_requests.labels("manifest", result).inc()
        if not body:
            # A GET would count as a Docker Hub pull; a HEAD does not.
            info = await self.upstream.head_manifest(repository, key)
            return Manifest(key, info.media_type, info.size, None)
        return await self._manifest_fetches.do(
            key, lambda: self._fetch_manifest(repository, key, digest)
        )

    async def _fetch_manifest(
        self, repository: str, reference: str, expected: Digest | None
    ) -> Manifest:
        """GET a manifest upstream, verify its digest, store it.

        Raises ManifestUnknown, DigestMismatch, UpstreamError.
        """
        info, body = await self.upstream.get_manifest(repository, reference)
        claimed = _parse_claimed_digest(info.digest)
        algorithm = (expected or claimed or Digest("sha256", "")).algorithm
        actual = Digest.of(body, algorithm)
        for want in (expected, claimed):
            if want is not None and want != actual:
                self.metrics.verification_failures.labels("manifest").inc()
                log.warning(
                    "manifest %s@%s from upstream hashes to %s; not cached",
                    repository,
                    want,
                    actual,
                )
                raise DigestMismatch(str(want), str(actual))
        manifest = Manifest(str(actual), info.media_type, len(body), body)
        await self.metadata.put_manifest(
            repository, manifest.digest, info.media_type, body, self.clock()
        )
        self._manifests[manifest.digest] = manifest
        return manifest

    async def _resolve_tag(
        self, repository: str, tag: str, body: bool
    ) -> tuple[TagRecord, bool]:
        """The tag's current record and whether it is stale.

        Raises ManifestUnknown, DigestMismatch, UpstreamError (the last only
        when nothing is cached for the tag).
        """
        record = await self.metadata.get_tag(repository, tag)
        if record is not None and self.clock() - record.checked < self.tag_ttl:
            self.metrics.cache_requests.labels("tag", "hit").inc()
            return record, False
        key = (repository, tag)
        result = "joined" if self._tag_checks.in_flight(key) else "miss"
        try:
            fresh = await self._tag_checks.do(
                key, lambda: self._revalidate(repository, tag, known=record, body=body)
            )
        except (UpstreamError, DigestMismatch) as exc:
            if record is None or not self._may_serve_stale(record):
                self.metrics.cache_requests.labels("tag", result).inc()
                raise
            self.metrics.cache_requests.labels("tag", "stale").inc()
            log.warning(
                "upstream failed revalidating %s:%s (%s); serving cached %s",
                repository,
                tag,
                exc.message,
                record.digest,
            )
            return record, True
        self.metrics.cache_requests.labels("tag", result).inc()
        return fresh, False

    def _may_serve_stale(self, record: TagRecord) -> bool:
        """Within cache.max_stale of the last time upstream confirmed it."""
        age = self.clock() - record.checked
        return self.max_stale is None or age <= self.max_stale

    async def _revalidate(
        self, repository: str, tag: str, *, known: TagRecord | None, body: bool
    ) -> TagRecord:
        """Ask upstream what `tag` is now and record the answer.

        A tag never seen and asked for with a body is fetched with one GET;
        otherwise a HEAD tells the digest without spending a pull.
        """
        digest: str | None = None
        if known is not None or not body:
            info = await self.upstream.head_manifest(repository, tag)
            if _parse_claimed_digest(info.digest) is not None:
                digest = info.digest
        if digest is None:
            manifest = await self._fetch_manifest(repository, tag, None)
            digest = manifest.digest
            info = ManifestInfo(digest, manifest.media_type, manifest.size)
        now = self.clock()
        await self.metadata.put_tag(
            repository, tag, digest, info.media_type, info.size, now
        )
        if known is not None and known.digest != digest:
            log.info("tag %s:%s moved %s -> %s", repository, tag, known.digest, digest)
        fetched = known.fetched if known and known.digest == digest else now
        return TagRecord(
            repository, tag, digest, info.media_type, info.size, fetched, now
        )

    # --- blobs ----------------------------------------------------------------

    async def blob(self, repository: str, digest: Digest) -> CachedBlob | BlobDownload:
        """A cached blob, or a started download to read from.

        The caller must `release()` a returned download when done with it.
        Raises BlobUnknown, UpstreamError (before any byte is available).
        """
        download = self._downloads.get(digest)
        if download is None:
            # A stat of a cached dentry takes microseconds; doing it inline
            # keeps the map check and the store check in one event-loop step.
            size = _file_size(self.blobs.path(digest))
            if size is not None:
                self.metrics.cache_requests.labels("blob", "hit").inc()
                self.metadata.touch_blob(str(digest), self.clock())
                return CachedBlob(self.blobs.path(digest), size)
            self.metrics.cache_requests.labels("blob", "miss").inc()
            download = BlobDownload(repository, digest, self)
            self._downloads[digest] = download
            download.start()
        else:
            self.metrics.cache_requests.labels("blob", "joined").inc()
        download.acquire()
        try:
            await download.wait_started()
        except BaseException:
            download.release()
            raise
        return download

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The blob's size without fetching it (None if upstream won't say).

        Raises BlobUnknown, UpstreamError.
        """
        size = _file_size(self.blobs.path(digest))
        if size is not None:
            return size
        download = self._downloads.get(digest)
        if download is not None and download.size is not None:
            return download.size
        return await self.upstream.head_blob(repository, digest=str(digest))

    def _download_finished(self, download: BlobDownload) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    # --- tags -----------------------------------------------------------------

    async def list_tags(self, repository: str, params: dict[str, str]) -> Passthrough:
        """Raises NameUnknown, UpstreamError."""
        return await self.upstream.list_tags(repository, params)

    # --- health ---------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether to take traffic, and why; the details are for operators.

        Upstream being down does not make the mirror unready (serving its
        cache then is the point); credentials upstream rejected do, because
        every uncached pull will fail until someone fixes them.
        """
        upstream = self.upstream.status()
        problems = []
        if upstream.credentials_rejected:
            problems.append(f"upstream rejected the credentials of {upstream.identity}")
        details: dict[str, object] = {
            "problems": problems,
            "upstream": dataclasses.asdict(upstream),
            "downloads_in_progress": len(self._downloads),
        }
        return not problems, details


class BlobDownload:
    """One upstream fetch of one blob, shared by every reader attached to it.

    The fetch task appends to a temp file and publishes how many bytes are on
    disk; readers `pread` from a shared read-only fd, which stays valid when
    the file is renamed into the store or unlinked on failure. The last bytes
    are published only after the digest is verified, so no reader can finish
    a response with unverified content. On failure every reader gets the
    error, and the handlers abort their responses short of their length.
    """

    def __init__(
        self, repository: str, digest: Digest, cache: PullThroughCache
    ) -> None:
        self.repository = repository
        self.digest = digest
        self._cache = cache
        self.size: int | None = None
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._changed = asyncio.Event()
        self._fd: int | None = None
        self._refs = 1  # the fetch task's own reference
        # The newest batch, kept so readers that are caught up need no pread.
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
        on disk. Without it, the stream runs to the end of the blob and ends
        only after the digest was verified.

        Raises the download's error (UpstreamError, DigestMismatch, ...) if it
        fails before the stream is complete.
        """
        offset = start
        while True:
            limit = self._readable() if end is None else min(end, self._readable())
            if offset < limit:
                length = min(limit - offset, READ_CHUNK)
                yield await self._read(offset, length)
                offset += length
                continue
            if end is not None and offset >= end:
                return
            if end is None and self.verified and offset >= self.written:
                return
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    async def _read(self, offset: int, length: int) -> bytes:
        recent_end = self._recent_offset + len(self._recent)
        if self._recent_offset <= offset and offset + length <= recent_end:
            start = offset - self._recent_offset
            return self._recent[start : start + length]
        if self._fd is None:  # only after release(): a reader outlived its ref
            raise RuntimeError("read from a released download")
        return await asyncio.to_thread(os.pread, self._fd, length, offset)

    async def _run(self) -> None:
        cache = self._cache
        temp = cache.blobs.temp_path()
        cache.metrics.downloads_in_progress.inc()
        write_fd: int | None = None
        try:
            write_fd = await asyncio.to_thread(
                os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
            self._fd = await asyncio.to_thread(os.open, temp, os.O_RDONLY)
            hasher = self.digest.hasher()
            resumes = 0
            while True:
                try:
                    await self._fetch(write_fd, hasher)
                    break
                except _BodyCut as cut:
                    if resumes >= cache.resume_attempts:
                        raise
                    resumes += 1
                    cache.metrics.blob_resumes.inc()
                    log.info(
                        "upstream cut blob %s at byte %d of %s (%s); resuming (%d/%d)",
                        self.digest,
                        self.written,
                        self.size,
                        cut.detail,
                        resumes,
                        cache.resume_attempts,
                    )
            actual = Digest(self.digest.algorithm, hasher.hexdigest())
            if actual != self.digest:
                raise DigestMismatch(str(self.digest), str(actual))
            await asyncio.to_thread(os.close, write_fd)
            write_fd = None
            await cache.blobs.commit(temp, self.digest)
            await cache.metadata.add_blob(str(self.digest), self.written, cache.clock())
            self.verified = True
            log.info(
                "cached blob %s (%d bytes) for %s",
                self.digest,
                self.written,
                self.repository,
            )
        except BaseException as exc:
            self.error = _as_domain_error(exc)
            if isinstance(exc, DigestMismatch | _BodyCut):
                cache.metrics.verification_failures.labels("blob").inc()
            log.warning(
                "download of blob %s for %s failed after %d bytes: %s",
                self.digest,
                self.repository,
                self.written,
                self.error,
            )
            if write_fd is not None:
                os.close(write_fd)
            await asyncio.shield(cache.blobs.discard(temp))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            cache.metrics.downloads_in_progress.dec()
            cache._download_finished(self)
            self._started.set()
            self._notify()
            self.release()

    async def _fetch(self, fd: int, hasher: Hasher) -> None:
        """One upstream request, from byte `written` on, appended to `fd`.

        Raises _BodyCut if the body ends early (resumable), UpstreamError if
        upstream refuses, DigestMismatch if the body is longer than declared
        or upstream changed its size.
        """
        cache = self._cache
        async with cache.upstream.blob(
            self.repository, str(self.digest), offset=self.written
        ) as resp:
            if self.size is None:
                self.size = resp.size
            elif resp.size is not None and resp.size != self.size:
                raise DigestMismatch(
                    str(self.digest), f"size changed from {self.size} to {resp.size}"
                )
            # A 200 to a Range request restarts at 0: skip what we have.
            await self._copy(resp.content, fd, hasher, skip=self.written - resp.offset)
        if self.size is not None and self.written < self.size:
            raise _BodyCut(
                "upstream blob body cut short",
                {"received": self.written, "expected": self.size},
            )

    async def _copy(
        self, content: aiohttp.StreamReader, fd: int, hasher: Hasher, skip: int
    ) -> None:
        """Hash and append the body to `fd`, publishing progress as it goes.

        Raises _BodyCut if reading fails, DigestMismatch if the body runs
        past the declared size.
        """
        metrics = self._cache.metrics.upstream_bytes.labels("blob")

        def append(data: bytes) -> None:
            # hashlib and os.write release the GIL: this runs in parallel.
            hasher.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

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
                metrics.inc(len(batch))
                if skip:
                    batch, skip = batch[skip:], max(0, skip - len(batch))
                    if not batch:
                        continue
                await asyncio.to_thread(append, batch)
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


class _BodyCut(UpstreamUnavailable):
    """Upstream's blob body ended early: worth resuming with a Range."""


def _file_size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _parse_claimed_digest(value: str | None) -> Digest | None:
    if not value:
        return None
    with contextlib.suppress(DigestInvalid):
        return parse_digest(value)
    return None


def _as_domain_error(exc: BaseException) -> BaseException:
    """What readers of a failed download are told."""
    if isinstance(exc, MirrorError | asyncio.CancelledError):
        return exc
    if isinstance(exc, OSError):
        return UpstreamUnavailable(
            "mirror could not store the blob", {"error": str(exc)}
        )
    return exc
