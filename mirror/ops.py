"""Operator commands on a cache directory: status, ls, purge, gc, verify.

Each command opens the cache the daemon uses, safely while it runs: SQLite is
in WAL mode with a busy timeout, so readers see a consistent snapshot and a
purge's one write transaction briefly queues the daemon's writes; blobs leave
the store by `BlobStore.detach` (one rename out of `blobs/`) before their
bytes are discarded, so a reader that already opened one keeps reading it.
The CLI never calls `BlobStore.open()`, which would empty `tmp/` under the
daemon's downloads in progress.

Images are named as for `docker pull` (`parse_image_ref`): bare names are
docker.io's, others carry their registry host (`ghcr.io/owner/app:1`). The
cache keeps tags and repository links per registry, so status, ls and purge
work per registry too, for any registry the cache holds.

The functions here return plain dataclasses; the `render_*` functions turn
them into the tables `mirror` prints, and `to_json` into what `--json`
prints. Errors an operator can act on are `OpsError`s carrying the exit
status the CLI should return.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor, PinSet
from mirror.cache.integrity import IntegrityReport
from mirror.cache.integrity import verify as verify_store
from mirror.cache.metadata import (
    DATABASE_NAME,
    CacheStats,
    MetadataStore,
    PurgeRecord,
    RegistryCounts,
    RepositorySummary,
    TagSummary,
)
from mirror.config import (
    DOCKER_HUB_HOSTS,
    DOCKER_IO,
    CacheConfig,
    parse_registry_host,
)
from mirror.errors import MirrorError
from mirror.logutil import human_size
from mirror.metrics import Metrics
from mirror.reference import names_a_registry, parse_digest, parse_name, parse_tag


class OpsError(Exception):
    """A command cannot do what was asked; the message is one line.

    `exit_status` is what the CLI returns, `kind` what `--json` reports.
    """

    exit_status = 1
    kind = "runtime"


class UsageError(OpsError):
    """The command line or the configuration is wrong (exit status 2)."""

    exit_status = 2
    kind = "usage"


class NoCache(UsageError):
    """There is no cache where the command looked (exit status 2)."""

    kind = "no_cache"


class NotInCache(OpsError):
    """The named repository or tag is not in the cache (exit status 1)."""

    kind = "not_found"


# --- image references ---------------------------------------------------------


def qualified_name(registry: str, repository: str) -> str:
    """A repository as operators write it: bare for docker.io
    (`library/alpine`), with its registry otherwise (`ghcr.io/owner/app`)."""
    return repository if registry == DOCKER_IO else f"{registry}/{repository}"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image: a registry, a repository (in `library/` form on docker.io)
    and a tag or a digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None
    registry: str = DOCKER_IO  # a host, lower case

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """The repository, qualified unless it is docker.io's."""
        return qualified_name(self.registry, self.repository)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_ref(text: str, *, default_tag: str | None = None) -> ImageRef:
    """`alpine`, `alpine:3`, `grafana/grafana:10`, `user/app@sha256:…`,
    `ghcr.io/owner/app:1`, `registry.corp:5000/team/app@sha256:…`.

    As Docker reads references, the first component names a registry when
    it contains `.` or `:` or is `localhost`; the host is lower-cased. No
    host, or `docker.io/` (`index.docker.io/`, `registry-1.docker.io/`),
    means docker.io, where single-component names become `library/<name>`,
    as the daemon stores them; other registries' names are kept as given.
    Without a tag or digest the tag is `default_tag`. Raises UsageError.
    """
    rest, at, digest = text.strip().partition("@")
    registry = DOCKER_IO
    first, slash, after = rest.partition("/")
    if slash and names_a_registry(first):
        try:
            host = parse_registry_host(first)
        except ValueError:
            raise UsageError(
                f"{text!r} is not an image reference: {first!r} is not a registry "
                "host (e.g. ghcr.io or registry.corp:5000)"
            ) from None
        registry = DOCKER_IO if host in DOCKER_HUB_HOSTS else host
        rest = after
    name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        ref = ImageRef(
            parse_name(name, official="library" if registry == DOCKER_IO else None),
            parse_tag(tag) if colon else default_tag,
            str(parse_digest(digest)) if at else None,
            registry,
        )
    except MirrorError as exc:
        raise UsageError(f"{text!r} is not an image reference: {exc.message}") from None
    return ref


# --- opening the cache --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cache:
    metadata: MetadataStore
    blobs: BlobStore


@contextlib.asynccontextmanager
async def open_cache(cache_dir: Path) -> AsyncIterator[Cache]:
    """The cache in `cache_dir`, which must exist; closes the database after.

    Opening migrates an older schema, like the daemon would. Raises
    NoCache when there is no cache there, UsageError when its schema is too
    new.
    """
    db_path = cache_dir / DATABASE_NAME
    if not db_path.is_file():
        raise NoCache(
            f"no cache in {cache_dir} ({DATABASE_NAME} not found; "
            "give --cache-dir, cache.dir or MIRROR_CACHE_DIR)"
        )
    metadata = MetadataStore(db_path)
    try:
        await metadata.open()
    except RuntimeError as exc:  # a database newer than this program
        raise UsageError(str(exc)) from None
    try:
        blobs = BlobStore(cache_dir)
        # detach() renames into tmp/; it exists whenever a daemon ran here.
        await asyncio.to_thread(blobs.tmp_dir.mkdir, parents=True, exist_ok=True)
        yield Cache(metadata, blobs)
    finally:
        await metadata.close()


# --- status -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    cache_dir: str
    size: int  # bytes of cached blobs
    max_size: int
    low_watermark: float
    min_free: int
    blobs: int
    manifests: int
    manifest_bytes: int
    tags: int
    repositories: int  # distinct (registry, repository)
    registries: list[RegistryCounts]  # docker.io first, then by host
    oldest_access: float | None  # seconds since the epoch, of a blob
    newest_access: float | None
    disk_free: int
    disk_total: int


async def status(cache: CacheConfig) -> Status:
    """Sizes, counts and free disk. Raises UsageError, sqlite3.Error."""
    async with open_cache(cache.dir) as opened:
        stats: CacheStats = await opened.metadata.cache_stats()
    usage = await asyncio.to_thread(shutil.disk_usage, cache.dir)
    return Status(
        cache_dir=str(cache.dir),
        size=stats.blob_bytes,
        max_size=cache.max_size,
        low_watermark=cache.low_watermark,
        min_free=cache.min_free,
        blobs=stats.blobs,
        manifests=stats.manifests,
        manifest_bytes=stats.manifest_bytes,
        tags=stats.tags,
        repositories=stats.repositories,
        registries=stats.registries,
        oldest_access=stats.oldest_access,
        newest_access=stats.newest_access,
        disk_free=usage.free,
        disk_total=usage.total,
    )


# --- ls -----------------------------------------------------------------------


async def list_repositories(cache: CacheConfig) -> list[RepositorySummary]:
    """Every cached repository of every registry, docker.io's first.

    Raises UsageError, sqlite3.Error.
    """
    async with open_cache(cache.dir) as opened:
        return await opened.metadata.repositories()


async def list_tags(
    cache: CacheConfig, registry: str, repository: str
) -> list[TagSummary]:
    """The cached tags of a repository of `registry` (normalised, e.g.
    `library/alpine` on docker.io). The registry need not be configured:
    this reads the cache.

    Raises NotInCache when the cache knows nothing of it, UsageError,
    sqlite3.Error.
    """
    async with open_cache(cache.dir) as opened:
        tags = await opened.metadata.repository_tags(registry, repository)
        if not tags and not any(
            (r.registry, r.repository) == (registry, repository)
            for r in await opened.metadata.repositories()
        ):
            raise NotInCache(
                f"{qualified_name(registry, repository)} is not in the cache"
            )
    return tags


# --- purge --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeReport:
    dry_run: bool
    record: PurgeRecord
    # Blob files found in the store and taken out (not counted in a dry run).
    files_removed: int = 0

    @property
    def freed(self) -> int:
        return sum(size for _digest, size in self.record.blobs)

    def as_json(self) -> dict[str, object]:
        """What `mirror purge --json` prints."""
        record = self.record
        return {
            "dry_run": self.dry_run,
            "tags": [
                {"registry": g, "repository": r, "tag": t, "digest": d}
                for g, r, t, d in record.tags
            ],
            "links": [
                {"registry": g, "repository": r, "digest": d}
                for g, r, d in record.links
            ],
            "manifests": [
                {"digest": d, "media_type": m, "size": n}
                for d, m, n in record.manifests
            ],
            "blobs": [{"digest": d, "size": n} for d, n in record.blobs],
            "freed": self.freed,
        }


async def purge(
    cache: CacheConfig,
    *,
    image: ImageRef | None = None,
    older_than: float | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    """Remove a repository or one tag (`image`, of its registry only), or
    what was last used more than `older_than` seconds before `now` (in every
    registry); then collect garbage. The exact rules are
    `MetadataStore.purge_repository` and `purge_older_than`.

    Blob files leave the store (a rename) inside the database transaction
    that deletes their rows, and are unlinked after it commits.

    Raises NotInCache when `image` names nothing cached, UsageError,
    sqlite3.Error.
    """
    if (image is None) == (older_than is None):
        raise UsageError("purge takes either REPO[:TAG] or --older-than")
    if image is not None and image.digest is not None:
        raise UsageError(f"{image}: purge takes REPO or REPO:TAG, not a digest")
    moved: list[Path] = []
    async with open_cache(cache.dir) as opened:

        def detach(digests: list[str]) -> None:
            # Runs inside the write transaction: renames only, microseconds each.
            for digest in digests:
                path = opened.blobs.detach(parse_digest(digest))
                if path is not None:
                    moved.append(path)

        try:
            if image is not None:
                record = await opened.metadata.purge_repository(
                    image.registry,
                    image.repository,
                    image.tag,
                    dry_run=dry_run,
                    before_commit=detach,
                )
                if record.empty:
                    raise NotInCache(f"{image} is not in the cache")
            else:
                cutoff = (time.time() if now is None else now) - (older_than or 0.0)
                record = await opened.metadata.purge_older_than(
                    cutoff, dry_run=dry_run, before_commit=detach
                )
        finally:
            for path in moved:
                await opened.blobs.discard(path)
    return PurgeReport(dry_run, record, len(moved))


# --- gc -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcReport:
    size_before: int
    size_after: int
    evicted: int
    freed: int
    max_size: int
    target: int  # what a pass frees down to once over max_size
    min_free: int
    disk_free: int


async def gc(cache: CacheConfig) -> GcReport:
    """One eviction pass now, with the configured limits.

    The same pass the daemon's worker runs: least recently used blobs go
    until the store is within budget and min_free is free. This process
    cannot see the daemon's pins (blobs being sent right now); a client
    reading one keeps its open file, the next request re-fetches it.
    Raises UsageError, sqlite3.Error.
    """
    async with open_cache(cache.dir) as opened:
        _count, size_before = await opened.metadata.blob_totals()
        evictor = Evictor(
            opened.metadata,
            opened.blobs,
            Metrics(),
            PinSet(),
            max_size=cache.max_size,
            min_free=cache.min_free,
            low_watermark=cache.low_watermark,
            interval=cache.eviction_interval,
        )
        result = await evictor.evict()
    usage = await asyncio.to_thread(shutil.disk_usage, cache.dir)
    return GcReport(
        size_before=size_before,
        size_after=result.size_after,
        evicted=result.evicted,
        freed=result.freed,
        max_size=cache.max_size,
        target=int(cache.max_size * cache.low_watermark),
        min_free=cache.min_free,
        disk_free=usage.free,
    )


# --- verify -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checked: int  # files hashed
    bytes: int
    removed: list[str]  # digests of files that did not match their digest
    rows_dropped: int  # rows whose file was missing
    adopted: int  # files without a row that matched their name


async def verify(
    cache: CacheConfig, progress: Callable[[int, int, int, int], None] | None = None
) -> VerifyReport:
    """Re-hash every blob and remove those that do not match.

    `progress(files_done, files, bytes_done, bytes)` is called after each
    file. Raises UsageError, sqlite3.Error.
    """
    hashed_files, hashed_bytes = 0, 0

    def count(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        nonlocal hashed_files, hashed_bytes
        hashed_files, hashed_bytes = done, done_bytes
        if progress is not None:
            progress(done, total, done_bytes, total_bytes)

    async with open_cache(cache.dir) as opened:
        report: IntegrityReport = await verify_store(
            opened.metadata, opened.blobs, count
        )
    return VerifyReport(
        checked=hashed_files,
        bytes=hashed_bytes,
        removed=report.removed,
        rows_dropped=report.rows_dropped,
        adopted=report.adopted,
    )


class Progress:
    """A progress display on a stream (stderr).

    On a terminal, one line rewritten in place (at most every `tty_interval`
    seconds); otherwise a line every `interval` seconds, so a log collector
    gets a heartbeat rather than a flood. `finish()` ends the display.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        interval: float = 10.0,
        tty_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = tty_interval if self.tty else interval
        self.clock = clock
        self._last = -float("inf")
        self._shown = ""

    def show(self, line: str, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._shown = line
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the line shown; the next `show` is shown at once."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = ""
        self._last = -float("inf")

    def transfer_callback(self) -> Callable[[str, int, int | None], None]:
        """`update(name, done, total)` shows `library/alpine:3 12.3 MiB /
        45.6 MiB (27%)`, or without the total when it is unknown (None);
        the line that reaches the total is shown whatever the interval."""

        def update(name: str, done: int, total: int | None) -> None:
            if total is None:
                self.show(f"{name} {human_size(done)}")
                return
            share = done / total if total else 1.0
            self.show(
                f"{name} {human_size(done)} / {human_size(total)} ({share:.0%})",
                force=done >= total,
            )

        return update

    def verify_callback(self) -> Callable[[int, int, int, int], None]:
        def update(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
            share = done_bytes / total_bytes if total_bytes else 1.0
            self.show(
                f"verifying: {done}/{total} blobs, {human_size(done_bytes)} of "
                f"{human_size(total_bytes)} ({share:.0%})",
                force=done == total,
            )

        return update


# --- rendering ----------------------------------------------------------------

MEDIA_TYPE_NAMES = {
    "application/vnd.oci.image.index.v1+json": "OCI index",
    "application/vnd.oci.image.manifest.v1+json": "OCI manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "Docker list",
    "application/vnd.docker.distribution.manifest.v2+json": "Docker manifest",
}


def to_json(value: Any) -> str:
    """`--json` output: dataclasses as objects, tuples as arrays."""

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            }
        if isinstance(obj, list | tuple):
            return [convert(item) for item in obj]
        if isinstance(obj, dict):
            return {str(k): convert(v) for k, v in obj.items()}
        return obj

    return json.dumps(convert(value), indent=2)


def human_age(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit} ago"
    raise AssertionError("unreachable")  # pragma: no cover


def human_time(timestamp: float | None, now: float) -> str:
    """Local time to the minute, and how long ago: `2024-05-01 12:00 (3d ago)`."""
    if not timestamp:
        return "-"
    local = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return f"{local:%Y-%m-%d %H:%M} ({human_age(max(0.0, now - timestamp))})"


def short_digest(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}:{hex_[:12]}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 0) -> str:
    """Columns padded to their widest cell; the last `right` columns are
    right-aligned (numbers)."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    first_right = len(headers) - right
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if i >= first_right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render_status(s: Status, now: float) -> str:
    share = s.size / s.max_size if s.max_size else 0.0
    disk_share = s.disk_free / s.disk_total if s.disk_total else 0.0
    rows = [
        ("cache", s.cache_dir),
        (
            "size",
            f"{human_size(s.size)} of {human_size(s.max_size)} ({share:.0%}); "
            f"eviction frees down to {s.low_watermark:.0%}",
        ),
        ("blobs", str(s.blobs)),
        ("manifests", f"{s.manifests} ({human_size(s.manifest_bytes)})"),
        ("tags", f"{s.tags} in {s.repositories} repositories"),
        *(
            (f"  {c.registry}", f"{c.tags} in {c.repositories} repositories")
            for c in s.registries
        ),
        ("oldest access", human_time(s.oldest_access, now)),
        ("newest access", human_time(s.newest_access, now)),
        (
            "disk free",
            f"{human_size(s.disk_free)} of {human_size(s.disk_total)} "
            f"({disk_share:.0%}); keeps at least {human_size(s.min_free)}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cached_cell(size: int, cached: int) -> str:
    if size == 0:
        return human_size(cached)
    return f"{human_size(cached)} ({min(cached / size, 1.0):.0%})"


def render_repositories(repos: list[RepositorySummary], now: float) -> str:
    if not repos:
        return "the cache is empty"
    rows = [
        (
            qualified_name(r.registry, r.repository),
            human_time(r.last_pulled, now),
            str(r.tags),
            human_size(r.size),
            _cached_cell(r.size, r.cached),
        )
        for r in repos
    ]
    return table(("REPOSITORY", "LAST PULLED", "TAGS", "SIZE", "CACHED"), rows, 3)


def render_tags(name: str, tags: list[TagSummary], now: float) -> str:
    """The tags of one repository, under its (qualified) `name`."""
    if not tags:
        return f"{name}: no tags cached (only manifests by digest)"
    rows = []
    for t in tags:
        platforms = "-" if t.platforms is None else f"{t.platforms[0]}/{t.platforms[1]}"
        size = human_size(t.size) if t.manifest_cached else "?"
        rows.append(
            (
                t.tag,
                short_digest(t.digest),
                human_time(t.last_pulled, now),
                platforms,
                size,
                _cached_cell(t.size, t.cached),
            )
        )
    headers = ("TAG", "DIGEST", "LAST PULLED", "PLATFORMS", "SIZE", "CACHED")
    return f"{name}\n" + table(headers, rows, 3)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_purge(report: PurgeReport) -> str:
    verb = "would remove" if report.dry_run else "removed"
    record = report.record
    lines = [
        *(
            f"{verb} tag {qualified_name(g, r)}:{t} ({short_digest(d)})"
            for g, r, t, d in record.tags
        ),
        *(
            f"{verb} link {qualified_name(g, r)}@{short_digest(d)}"
            for g, r, d in record.links
        ),
        *(
            f"{verb} manifest {short_digest(d)} "
            f"({MEDIA_TYPE_NAMES.get(media, media)}, {human_size(n)})"
            for d, media, n in record.manifests
        ),
        *(f"{verb} blob {short_digest(d)} ({human_size(n)})" for d, n in record.blobs),
    ]
    lines.append(
        f"{verb} {_plural(len(record.tags), 'tag')}, "
        f"{_plural(len(record.links), 'repository link')}, "
        f"{_plural(len(record.manifests), 'manifest')} and "
        f"{_plural(len(record.blobs), 'blob')} ({human_size(report.freed)})"
    )
    return "\n".join(lines)


def render_gc(report: GcReport) -> str:
    if report.evicted == 0:
        return (
            f"nothing to evict: {human_size(report.size_after)} of "
            f"{human_size(report.max_size)}, {human_size(report.disk_free)} free"
        )
    return (
        f"evicted {_plural(report.evicted, 'blob')} ({human_size(report.freed)}): "
        f"{human_size(report.size_before)} -> {human_size(report.size_after)} of "
        f"{human_size(report.max_size)}, {human_size(report.disk_free)} free"
    )


def render_verify(report: VerifyReport) -> str:
    count = len(report.removed)
    verdict = (
        "all match"
        if count == 0
        else f"{count} did not match and "
        + ("was removed" if count == 1 else "were removed")
        + "".join(f"\n  removed {digest}" for digest in report.removed)
    )
    line = (
        f"verified {_plural(report.checked, 'blob')} ({human_size(report.bytes)}): "
        + verdict
    )
    extras = []
    if report.rows_dropped:
        extras.append(f"{report.rows_dropped} rows without a file dropped")
    if report.adopted:
        extras.append(f"{report.adopted} files without a row adopted")
    return line + (f"; {', '.join(extras)}" if extras else "")
