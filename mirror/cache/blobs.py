"""BlobStore: verified blobs on disk, keyed by digest.

Layout under the cache directory::

    blobs/<algorithm>/<first two hex>/<hex>   complete, verified blobs
    tmp/<uuid>                                 downloads in progress

A file only ever appears under blobs/ by `os.replace` of a temp file whose
digest and size were checked first, after an fsync, so a blob path either does
not exist or holds exactly the right bytes. Temp files left by a crash are
removed by `open()`. Blocking calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from pathlib import Path

from mirror.reference import Digest


class BlobStore:
    """Digest-keyed files. Constructing it does no I/O; call `open()` first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"

    async def open(self) -> None:
        """Create the directories and drop temp files a crash left behind."""
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    async def size(self, digest: Digest) -> int | None:
        """Size of the cached blob, or None when it is not cached."""
        try:
            stat = await asyncio.to_thread(os.stat, self.path(digest))
        except FileNotFoundError:
            return None
        return stat.st_size

    def temp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    async def commit(self, temp: Path, digest: Digest) -> Path:
        """Make a verified temp file the blob for `digest` (fsync, rename).

        The caller has checked the digest; the caller's open fds stay valid.
        """
        final = self.path(digest)
        await asyncio.to_thread(self._commit, temp, final)
        return final

    @staticmethod
    def _commit(temp: Path, final: Path) -> None:
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)

    async def discard(self, temp: Path) -> None:
        """Remove a temp file if it is still there."""
        await asyncio.to_thread(_unlink_quietly, temp)

    async def delete(self, digest: Digest) -> None:
        await asyncio.to_thread(_unlink_quietly, self.path(digest))


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
