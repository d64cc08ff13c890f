"""PullThroughCache: what to serve from cache, what to fetch, and how.

Policy:

* Content by digest never changes: served from cache when present, otherwise
  fetched once, verified against its digest, cached, served.
* A tag is answered from cache for `tag_ttl` after upstream last confirmed it.
  After that one upstream HEAD (which Docker Hub does not count as a pull)
  revalidates it; the manifest is fetched only if its digest is not cached.
  If upstream fails, the cached digest is served and counted as stale.
* A blob miss starts one `BlobDownload` (download.py). Every request for that
  digest while it runs attaches to it as a `Reader` and is sent the blob from
  byte 0, then follows live. The download runs in its own task, so clients
  leaving do not stop it.

Concurrent work on one key is shared through `SingleFlight` (manifests, tag
revalidations) or the `_downloads` map (blobs).

Every request names a `Registry` (registry.py) and a repository on it. Tags
are that registry's: (registry, repository, tag). Content is not: a digest
cached through any registry is served through every one, and a digest in
flight is fetched once, from the registry the first request named.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from mirror import outcome
from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor, PinSet
from mirror.cache.metadata import MetadataStore, ReferrersRecord, TagRecord
from mirror.config import small_blob_slots
from mirror.download import (
    DOWNLOAD_MEMORY,
    BlobDownload,
    DownloadContext,
    DownloadSlots,
    MemoryBudget,
    Reader,
)
from mirror.errors import (
    DigestInvalid,
    DigestMismatch,
    NotFound,
    ReferrersUnknown,
    UpstreamDenied,
    UpstreamError,
)
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.registry import Registries, Registry
from mirror.singleflight import SingleFlight
from mirror.upstream.client import ManifestInfo, Passthrough

log = logging.getLogger(__name__)

# Seconds a verified download may take to reach the store at shutdown.
SHUTDOWN_GRACE = 10.0
# Tag records kept in memory.
TAG_MEMORY = 65536
# Bytes of manifests kept in memory for hot tags and digests.
MANIFEST_MEMORY = 64 * 1024 * 1024
# How many repositories one request for a digest may ask upstream through:
# its own, after joining fetches through others that upstream refused.
_ATTEMPTS_ACROSS_REPOSITORIES = 3


# Where a fetch asks upstream: a registry's name and a repository on it.
Source = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    body: bytes | None  # None when only the headers were asked for
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Referrers:
    """A referrers list (an OCI image index) as upstream sent it."""

    media_type: str
    body: bytes
    filters: str | None  # OCI-Filters-Applied
    link: str | None  # the next page, if upstream paginated
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
        registries: Registries,
        metrics: Metrics,
        *,
        evictor: Evictor,
        pins: PinSet,
        max_downloads: int = 64,
        download_memory: int = DOWNLOAD_MEMORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.registries = registries
        self.metrics = metrics
        self.pins = pins
        self.clock = clock
        self._download_context = DownloadContext(
            blobs,
            metadata,
            metrics,
            evictor,
            DownloadSlots(max_downloads, metrics, small_blob_slots(max_downloads)),
            MemoryBudget(download_memory, metrics),
            clock,
        )
        self._manifests: LRUCache[str, Manifest] = LRUCache(
            maxsize=MANIFEST_MEMORY, getsizeof=lambda m: m.size or 1
        )
        # Tag records, so a hot tag costs no database read.
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(
            maxsize=TAG_MEMORY
        )
        self._manifest_fetches: SingleFlight[str, Manifest] = SingleFlight()
        # Where each manifest fetch in flight asks upstream.
        self._manifest_fetch_source: dict[str, Source] = {}
        self._tag_checks: SingleFlight[tuple[str, str, str], TagRecord] = SingleFlight()
        self._referrer_checks: SingleFlight[
            tuple[str, str, str, str], ReferrersRecord
        ] = SingleFlight()
        # Downloads new readers may join, and every download still running.
        self._downloads: dict[Digest, BlobDownload] = {}
        self._running: set[BlobDownload] = set()

    async def idle(self) -> None:
        """Wait until no download is running: every blob a client received
        in full is in the store (or was not cacheable)."""
        while self._running:
            await asyncio.gather(
                *(d.task for d in list(self._running) if d.task),
                return_exceptions=True,
            )

    async def close(self) -> None:
        """Stop every download and shared fetch in flight (shutdown).

        Downloads already verified are only writing and committing: they get
        a few seconds to finish, so a blob clients received gets cached.
        """
        running = list(self._running)
        finishing = [d.task for d in running if d.verified and d.task]
        if finishing:
            await asyncio.wait(finishing, timeout=SHUTDOWN_GRACE)
        for download in running:
            download.cancel()
        await asyncio.gather(
            *(d.task for d in running if d.task), return_exceptions=True
        )
        await self._manifest_fetches.cancel_all()
        await self._tag_checks.cancel_all()
        await self._referrer_checks.cancel_all()

    # --- manifests ------------------------------------------------------------

    async def manifest(
        self,
        registry: Registry,
        repository: str,
        reference: str | Digest,
        *,
        body: bool = True,
    ) -> Manifest:
        """The manifest for a tag or digest; `body=False` for a HEAD.

        Raises ManifestUnknown, DigestMismatch, UpstreamError.
        """
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(
                registry, repository, reference, body=body
            )
        record, stale = await self._resolve_tag(registry, repository, reference, body)
        if not body:
            return Manifest(
                record.digest, record.media_type, record.size, None, stale=stale
            )
        manifest = await self._manifest_by_digest(
            registry, repository, parse_digest(record.digest)
        )
        return Manifest(
            manifest.digest, manifest.media_type, manifest.size, manifest.body, stale
        )

    async def _manifest_by_digest(
        self, registry: Registry, repository: str, digest: Digest, *, body: bool = True
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
            _count(registry, "manifest", "hit")
            self.metadata.touch_manifest(key, now)
            return cached
        result = "joined" if self._manifest_fetches.in_flight(key) else "miss"
        _count(registry, "manifest", result)
        if not body:
            # A GET would count as a Docker Hub pull; a HEAD does not.
            info = await registry.upstream.head_manifest(repository, key)
            return Manifest(key, info.media_type, info.size, None)
        ours = (registry.name, repository)
        for _ in range(_ATTEMPTS_ACROSS_REPOSITORIES):
            asked = self._manifest_fetch_source.setdefault(key, ours)
            try:
                return await self._manifest_fetches.do(
                    key,
                    lambda: self._fetch_manifest_once(registry, repository, digest),
                )
            except (NotFound, UpstreamDenied):
                # Joined a fetch through a repository (or registry) upstream
                # refused: the digest may still exist in ours, so ask ours.
                if asked == ours:
                    raise
        return await self._fetch_manifest_once(registry, repository, digest)

    async def _fetch_manifest_once(
        self, registry: Registry, repository: str, digest: Digest
    ) -> Manifest:
        try:
            return await self._fetch_manifest(registry, repository, str(digest), digest)
        finally:
            self._manifest_fetch_source.pop(str(digest), None)

    async def _fetch_manifest(
        self,
        registry: Registry,
        repository: str,
        reference: str,
        expected: Digest | None,
    ) -> Manifest:
        """GET a manifest upstream, verify its digest, store it.

        Raises ManifestUnknown, DigestMismatch, UpstreamError.
        """
        info, body = await registry.upstream.get_manifest(repository, reference)
        claimed = _parse_claimed_digest(info.digest)
        algorithm = (expected or claimed or Digest("sha256", "")).algorithm
        actual = Digest.of(body, algorithm)
        for want in (expected, claimed):
            if want is not None and want != actual:
                registry.metrics.verification_failures.labels("manifest").inc()
                log.warning(
                    "manifest %s/%s@%s from upstream hashes to %s; not cached",
                    registry.name,
                    repository,
                    want,
                    actual,
                )
                raise DigestMismatch(str(want), str(actual))
        manifest = Manifest(str(actual), info.media_type, len(body), body)
        await self.metadata.put_manifest(
            registry.name,
            repository,
            manifest.digest,
            info.media_type,
            body,
            self.clock(),
        )
        self._manifests[manifest.digest] = manifest
        return manifest

    async def _resolve_tag(
        self, registry: Registry, repository: str, tag: str, body: bool
    ) -> tuple[TagRecord, bool]:
        """The tag's current record and whether it is stale.

        Raises ManifestUnknown, DigestMismatch, UpstreamError (the last only
        when nothing is cached for the tag).
        """
        key = (registry.name, repository, tag)
        record = self._tags.get(key)
        if record is None:
            record = await self.metadata.get_tag(registry.name, repository, tag)
            # A revalidation may have finished while we read: prefer its answer
            # to our snapshot, or we would revalidate again right behind it.
            record = self._tags.get(key) or record
            if record is not None:
                self._tags[key] = record
        now = self.clock()
        if record is not None and now - record.checked < registry.tag_ttl:
            _count(registry, "tag", "hit")
            self.metadata.touch_tag(registry.name, repository, tag, now)
            return record, False
        result = "joined" if self._tag_checks.in_flight(key) else "miss"
        try:
            fresh = await self._tag_checks.do(
                key,
                lambda: self._revalidate(
                    registry, repository, tag, known=record, body=body
                ),
            )
        except (UpstreamError, DigestMismatch) as exc:
            if record is None or not self._may_serve_stale(registry, record):
                _count(registry, "tag", result)
                raise
            _count(registry, "tag", "stale")
            log.warning(
                "upstream failed revalidating %s/%s:%s (%s); serving cached %s",
                registry.name,
                repository,
                tag,
                exc.message,
                record.digest,
            )
            return record, True
        _count(registry, "tag", result)
        return fresh, False

    def _may_serve_stale(
        self, registry: Registry, record: TagRecord | ReferrersRecord
    ) -> bool:
        """Within the registry's max_stale of when upstream last confirmed it."""
        age = self.clock() - record.checked
        return registry.max_stale is None or age <= registry.max_stale

    async def _revalidate(
        self,
        registry: Registry,
        repository: str,
        tag: str,
        *,
        known: TagRecord | None,
        body: bool,
    ) -> TagRecord:
        """Ask upstream what `tag` is now and record the answer.

        A tag never seen and asked for with a body is fetched with one GET;
        otherwise a HEAD tells the digest without spending a pull.
        """
        digest: str | None = None
        if known is not None or not body:
            info = await registry.upstream.head_manifest(repository, tag)
            if _parse_claimed_digest(info.digest) is not None:
                digest = info.digest
        if digest is None:
            manifest = await self._fetch_manifest(registry, repository, tag, None)
            digest = manifest.digest
            info = ManifestInfo(digest, manifest.media_type, manifest.size)
        now = self.clock()
        await self.metadata.put_tag(
            registry.name, repository, tag, digest, info.media_type, info.size, now
        )
        if known is not None and known.digest != digest:
            log.info(
                "tag %s/%s:%s moved %s -> %s",
                registry.name,
                repository,
                tag,
                known.digest,
                digest,
            )
        fetched = known.fetched if known and known.digest == digest else now
        record = TagRecord(
            registry.name,
            repository,
            tag,
            digest,
            info.media_type,
            info.size,
            fetched,
            now,
        )
        self._tags[(registry.name, repository, tag)] = record
        return record

    # --- blobs ----------------------------------------------------------------

    async def blob(
        self, registry: Registry, repository: str, digest: Digest
    ) -> CachedBlob | Reader:
        """A cached blob, or a started download to read from.

        A request that joined a download through another repository (or
        registry), which upstream refused, asks again through its own.

        The caller must `close()` a returned reader when done with it.
        Raises BlobUnknown, UpstreamError (before any byte is available).
        """
        ours = (registry.name, repository)
        for attempt in range(1, _ATTEMPTS_ACROSS_REPOSITORIES + 1):
            source = self._blob_source(registry, repository, digest)
            if isinstance(source, CachedBlob):
                return source
            try:
                await source.download.wait_started()
            except (NotFound, UpstreamDenied):
                source.close()
                asked = source.download.source
                if asked == ours or attempt == _ATTEMPTS_ACROSS_REPOSITORIES:
                    raise
                continue
            except BaseException:
                source.close()
                raise
            return source
        raise AssertionError("unreachable")  # pragma: no cover

    def _blob_source(
        self, registry: Registry, repository: str, digest: Digest
    ) -> CachedBlob | Reader:
        """The cached file, or a reader of the download in flight (started
        here if there is none). One event-loop step, no await."""
        download = self._downloads.get(digest)
        if download is None:
            # A stat of a cached dentry takes microseconds; doing it inline
            # keeps the map check and the store check in one event-loop step.
            size = _file_size(self.blobs.path(digest))
            if size is not None:
                _count(registry, "blob", "hit")
                self.metadata.touch_blob(str(digest), self.clock())
                return CachedBlob(self.blobs.path(digest), size)
            _count(registry, "blob", "miss")
            download = BlobDownload(
                registry, repository, digest, self._download_context, self._detach
            )
            self._downloads[digest] = download
            self._running.add(download)
            download.start().add_done_callback(
                lambda _t: self._running.discard(download)
            )
        else:
            _count(registry, "blob", "joined")
        return download.attach()

    async def blob_size(
        self, registry: Registry, repository: str, digest: Digest
    ) -> int | None:
        """The blob's size without fetching it (None if upstream won't say).

        Raises BlobUnknown, UpstreamError.
        """
        size = _file_size(self.blobs.path(digest))
        if size is not None:
            return size
        download = self._downloads.get(digest)
        if download is not None and download.size is not None:
            return download.size
        return await registry.upstream.head_blob(repository, digest=str(digest))

    def _detach(self, download: BlobDownload) -> None:
        """No new reader may join `download` (it ended, or went uncached)."""
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    # --- tags -----------------------------------------------------------------

    async def list_tags(
        self, registry: Registry, repository: str, params: dict[str, str]
    ) -> Passthrough:
        """Raises NameUnknown, UpstreamError."""
        return await registry.upstream.list_tags(repository, params)

    # --- referrers ------------------------------------------------------------

    async def referrers(
        self,
        registry: Registry,
        repository: str,
        digest: Digest,
        params: dict[str, str],
    ) -> Referrers:
        """The manifests whose subject is `digest` (OCI 1.1 referrers API).

        Cached like a tag: answered from the database for the registry's
        tag_ttl, then asked again, and served stale (within max_stale) when
        upstream fails. Only the first page is cached, with or without an
        `artifactType` filter; other queries (a paginated upstream's next
        pages) are relayed. An upstream 404, which a registry without the
        API answers, is cached and passed on, so clients use the tag schema.

        Raises ReferrersUnknown (upstream said 404), UpstreamError.
        """
        if set(params) - {"artifactType"}:
            _count(registry, "referrers", "miss")
            answer = await registry.upstream.get_referrers(
                repository, str(digest), params
            )
            if answer is None:
                raise ReferrersUnknown(str(digest))
            return Referrers(
                answer.content_type, answer.body, answer.filters, answer.link
            )
        artifact_type = params.get("artifactType", "")
        key = (registry.name, repository, str(digest), artifact_type)
        record = await self.metadata.get_referrers(*key)
        stale = False
        if record is not None and self.clock() - record.checked < registry.tag_ttl:
            _count(registry, "referrers", "hit")
        else:
            result = "joined" if self._referrer_checks.in_flight(key) else "miss"
            try:
                record = await self._referrer_checks.do(
                    key, lambda: self._fetch_referrers(registry, key, params)
                )
            except UpstreamError as exc:
                if record is None or not self._may_serve_stale(registry, record):
                    _count(registry, "referrers", result)
                    raise
                log.warning(
                    "upstream failed listing referrers of %s in %s/%s (%s); "
                    "serving the cached list",
                    digest,
                    registry.name,
                    repository,
                    exc.message,
                )
                result, stale = "stale", True
            _count(registry, "referrers", result)
        if record.status == 404:
            raise ReferrersUnknown(str(digest))
        return Referrers(record.media_type, record.body, record.filters, None, stale)

    async def _fetch_referrers(
        self,
        registry: Registry,
        key: tuple[str, str, str, str],
        params: dict[str, str],
    ) -> ReferrersRecord:
        _registry, repository, subject, artifact_type = key
        answer = await registry.upstream.get_referrers(repository, subject, params)
        now = self.clock()
        if answer is None:
            record = ReferrersRecord(404, "", b"", None, now)
        else:
            record = ReferrersRecord(
                answer.status, answer.content_type, answer.body, answer.filters, now
            )
        await self.metadata.put_referrers(
            registry.name, repository, subject, artifact_type, record
        )
        return record

    def forget(self) -> None:
        """Drop the in-memory tags and manifests (the database changed under
        us, e.g. `mirror purge`); they are read again on the next request."""
        self._tags.clear()
        self._manifests.clear()

    # --- health ---------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether to take traffic, and why; the details are for operators.

        An upstream being down does not make the mirror unready (serving its
        cache then is the point). Credentials an upstream rejected are a
        problem of that registry: every uncached pull from it fails until
        someone fixes them. The mirror is unready only when that is true of
        every registry it serves, since another node, configured alike,
        would do no better, and the registries still working need it.
        """
        problems = []
        registries: dict[str, object] = {}
        for registry in self.registries:
            status = registry.upstream.status()
            ready = not status.credentials_rejected
            if not ready:
                problems.append(f"{registry.name} rejected the configured credentials")
            registries[registry.name] = {"ready": ready, **dataclasses.asdict(status)}
        details: dict[str, object] = {
            "problems": problems,
            "registries": registries,
            "downloads_in_progress": len(self._downloads),
        }
        return len(problems) < len(self.registries), details


def _count(registry: Registry, kind: str, result: str) -> None:
    """Count a cache lookup, and note it on the request it was made for."""
    registry.metrics.cache_requests.labels(kind, result).inc()
    outcome.note_cache(registry.name, result)


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
