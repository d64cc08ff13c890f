"""What is in a mirror's cache directory, and whether any of it is wrong.

Read straight from disk and SQLite (no mirror code), so a test can say
"nothing was cached" or "what was cached is sound" after a hostile upstream
or a fuzzer had its go. Blocking; call it after `Mirror.settle()`.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

# RFC 9110 media-type: token "/" token, parameters already stripped.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")


@dataclass(frozen=True)
class Cached:
    files: dict[str, bytes]  # digest -> bytes of every file under blobs/
    blob_rows: dict[str, int]  # digest -> size
    manifests: dict[str, tuple[str, bytes]]  # digest -> (media type, body)
    # (registry, repo, tag) -> (digest, type)
    tags: dict[tuple[str, str, str], tuple[str, str]]
    tmp: list[str]  # names under tmp/

    @property
    def empty(self) -> bool:
        """Nothing cached (temp files do not count; see `problems`)."""
        return not (self.files or self.blob_rows or self.manifests or self.tags)


def cached(cache_dir: Path) -> Cached:
    files: dict[str, bytes] = {}
    blob_dir = cache_dir / "blobs"
    if blob_dir.is_dir():
        for path in blob_dir.glob("*/*/*"):
            files[f"{path.parent.parent.name}:{path.name}"] = path.read_bytes()
    tmp_dir = cache_dir / "tmp"
    tmp = sorted(p.name for p in tmp_dir.iterdir()) if tmp_dir.is_dir() else []
    db = cache_dir / "mirror.db"
    if not db.is_file():
        return Cached(files, {}, {}, {}, tmp)
    with closing(sqlite3.connect(db)) as conn:
        blob_rows = {
            str(d): int(s) for d, s in conn.execute("SELECT digest, size FROM blobs")
        }
        manifests = {
            str(d): (str(t), bytes(b))
            for d, t, b in conn.execute(
                "SELECT digest, media_type, body FROM manifests"
            )
        }
        tags = {
            (str(g), str(r), str(t)): (str(d), str(m))
            for g, r, t, d, m in conn.execute(
                "SELECT registry, repository, tag, digest, media_type FROM tags"
            )
        }
    return Cached(files, blob_rows, manifests, tags, tmp)


def problems(cache_dir: Path) -> list[str]:
    """Everything wrong with the cache: files or manifests that do not hash
    to their digest, rows without files (or the reverse), sizes that differ,
    media types that are not `type/subtype`, and leftover temp files."""
    found: list[str] = []
    c = cached(cache_dir)
    for digest, data in c.files.items():
        if _digest_of(digest, data) != digest:
            found.append(f"blob file {digest} holds other bytes")
        if c.blob_rows.get(digest) != len(data):
            found.append(f"blob file {digest} has no row of its size")
    for digest in c.blob_rows.keys() - c.files.keys():
        found.append(f"blob row {digest} has no file")
    for digest, (media_type, body) in c.manifests.items():
        if _digest_of(digest, body) != digest:
            found.append(f"manifest {digest} holds other bytes")
        if not _MEDIA_TYPE.fullmatch(media_type):
            found.append(f"manifest {digest} has media type {media_type!r}")
    for (registry, repo, tag), (digest, media_type) in c.tags.items():
        if not _MEDIA_TYPE.fullmatch(media_type):
            found.append(
                f"tag {registry}/{repo}:{tag} -> {digest} has media type {media_type!r}"
            )
    found += [f"temp file {name} left over" for name in c.tmp]
    return found


def _digest_of(digest: str, data: bytes) -> str:
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        return "unverifiable:"
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
