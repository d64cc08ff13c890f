"""Keeping the blob files and the database honest with each other.

`reconcile()` runs at start-up, after a crash or a `kill -9` at any moment:

* a row whose file is missing is dropped (an eviction or purge was cut short,
  or someone deleted files by hand);
* a file without a row (a crash between the rename into the store and the
  insert) is hashed: adopted if it matches its name, removed if not;
* a file whose size disagrees with its row is hashed the same way.

Temp files of downloads in progress are removed by `BlobStore.open()` before
this runs, and blobs only ever enter the store verified, so after
reconciliation every blob the mirror can serve is whole and right.

`verify()` re-hashes every blob (`mirror verify`): bit rot, a disk that lied
about fsync, or hands in the cache directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mirror.cache.blobs import BlobStore
from mirror.cache.metadata import MetadataStore
from mirror.reference import Digest

log = logging.getLogger(__name__)

HASH_CHUNK = 4 * 1024 * 1024


@dataclass
class IntegrityReport:
    checked: int = 0
    rows_dropped: int = 0
    adopted: int = 0
    # Digests of files that did not match and were removed.
    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.checked} checked, {self.rows_dropped} rows without a file "
            f"dropped, {self.adopted} files adopted, "
            f"{len(self.removed)} bad files removed"
        )


def file_digest(path: Path, algorithm: str) -> str:
    """Hash a file in chunks (blocking: run it in a thread)."""
    hasher = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


async def _matches(path: Path, digest: Digest) -> bool | None:
    """Whether the file hashes to its digest; None if it is gone (evicted
    or purged meanwhile, which is not corruption)."""
    try:
        actual = await asyncio.to_thread(file_digest, path, digest.algorithm)
    except FileNotFoundError:
        return None
    return actual == digest.hex


async def reconcile(
    metadata: MetadataStore, blobs: BlobStore, now: float | None = None
) -> IntegrityReport:
    """Make rows and files agree (see the module docstring)."""
    now = time.time() if now is None else now
    report = IntegrityReport()
    rows = await metadata.all_blobs()
    files = await asyncio.to_thread(blobs.scan)
    missing = [d for d in rows if d not in files]
    if missing:
        await metadata.delete_blobs(missing)
        report.rows_dropped = len(missing)
    for key, size in files.items():
        if rows.get(key) == size:
            continue
        digest = Digest(*key.split(":", 1))
        report.checked += 1
        matches = await _matches(blobs.path(digest), digest)
        if matches:
            await metadata.add_blob(key, size, now)
            report.adopted += 1
        elif matches is False:
            await blobs.delete(digest)
            await metadata.delete_blobs([key])
            report.removed.append(key)
    if report.rows_dropped or report.adopted or report.removed:
        log.warning("reconciled the cache with its database: %s", report)
    return report


async def verify(
    metadata: MetadataStore,
    blobs: BlobStore,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> IntegrityReport:
    """Re-hash every blob; remove those that do not match.

    `progress(done_files, total_files, done_bytes, total_bytes)` is called
    after each file.
    """
    report = await reconcile(metadata, blobs)
    files = await asyncio.to_thread(blobs.scan)
    total_bytes = sum(files.values())
    done_bytes = 0
    for index, (key, size) in enumerate(sorted(files.items()), start=1):
        digest = Digest(*key.split(":", 1))
        report.checked += 1
        if await _matches(blobs.path(digest), digest) is False:
            log.error("blob %s does not match its digest; removed", key)
            await blobs.delete(digest)
            await metadata.delete_blobs([key])
            report.removed.append(key)
        done_bytes += size
        if progress is not None:
            progress(index, len(files), done_bytes, total_bytes)
    return report
