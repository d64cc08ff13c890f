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

from mirror.reference import DIGEST_HEX_LENGTHS, Digest


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

    def scan(self) -> dict[str, int]:
        """digest -> size of every blob file (blocking: run it in a thread).

        Files whose names are not digests are left alone and not listed.
        """
        found: dict[str, int] = {}
        if not self.blob_dir.is_dir():
            return found
        for algorithm_dir in self.blob_dir.iterdir():
            length = DIGEST_HEX_LENGTHS.get(algorithm_dir.name)
            if length is None:
                continue
            for prefix_dir in algorithm_dir.iterdir():
                if not prefix_dir.is_dir():
                    continue
                for entry in os.scandir(prefix_dir):
                    name = entry.name
                    if (
                        len(name) == length
                        and name.startswith(prefix_dir.name)
                        and all(c in "0123456789abcdef" for c in name)
                        and entry.is_file(follow_symlinks=False)
                    ):
                        found[f"{algorithm_dir.name}:{name}"] = entry.stat().st_size
        return found

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

    def detach(self, digest: Digest) -> Path | None:
        """Move a blob out of the store at once; None if it was not there.

        A rename is one metadata operation, done inline on purpose: a reader
        that found the blob before this call keeps a path that opens, and one
        that comes after sees a miss — no window in between. The caller
        discards the returned file, which may be large to unlink.
        """
        moved = self.tmp_dir / f"evicted-{uuid.uuid4().hex}"
        try:
            os.rename(self.path(digest), moved)
        except FileNotFoundError:
            return None
        return moved

    async def delete(self, digest: Digest) -> None:
        moved = self.detach(digest)
        if moved is not None:
            await self.discard(moved)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
