"""Looking into (and tampering with) a mirror's cache directory from outside.

This module owns ``CacheDir``: what a test sees on disk under ``cache.dir``
— verified blobs under ``blobs/sha256/<2 hex>/<hex>``, downloads in progress
under ``tmp/`` and the ``blobs`` table of ``mirror.db`` — read with plain
file calls and Python's ``sqlite3``, never through the mirror's own code, so
the tests check the layout the documentation promises rather than whatever
the implementation happens to do. It also plants files by hand, the way an
operator or a crash would leave them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheDir:
    """One mirror's ``cache.dir``; the mirror may or may not be running."""

    root: Path

    @property
    def blob_root(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def database(self) -> Path:
        return self.root / "mirror.db"

    def blob_path(self, digest: str) -> Path:
        hex_digest = digest.removeprefix("sha256:")
        return self.blob_root / hex_digest[:2] / hex_digest

    def blob_files(self) -> dict[str, int]:
        """``sha256:<hex>`` -> size of every file in the blob store."""
        sizes = _sizes(self.blob_root.glob("*/*"))
        return {"sha256:" + name: size for name, size in sizes.items()}

    def store_size(self) -> int:
        """Bytes of all blob files: what ``cache.max_size`` bounds."""
        return sum(self.blob_files().values())

    def tmp_files(self) -> dict[str, int]:
        """Name -> size of every file under ``tmp/``."""
        return _sizes(self.tmp.glob("*"))

    def rows(self) -> dict[str, int]:
        """digest -> size from the ``blobs`` table of ``mirror.db``.

        Safe while the mirror runs: the database is in WAL mode, so this
        read neither blocks nor is blocked by the daemon's writes.
        """
        with contextlib.closing(sqlite3.connect(self.database, timeout=5.0)) as db:
            found = db.execute("SELECT digest, size FROM blobs").fetchall()
        return {str(digest): int(size) for digest, size in found}

    def plant(self, digest: str, data: bytes) -> Path:
        """Put ``data`` where the blob ``digest`` would live, behind the DB's back."""
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def _sizes(paths: Iterable[Path]) -> dict[str, int]:
    """Name -> size of the regular files among ``paths``.

    The mirror may be running: a file listed a moment ago can be gone (an
    eviction renames blobs away, a download removes its temp file), and
    then it is simply not there.
    """
    found: dict[str, int] = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                found[path.name] = path.stat().st_size
    return found
