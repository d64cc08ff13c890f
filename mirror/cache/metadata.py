"""MetadataStore: manifests, tags and blob bookkeeping in SQLite (aiosqlite).

All SQL lives here, with bound parameters. The database runs in WAL mode so
the operator CLI can read it while the daemon writes. The schema version is
`PRAGMA user_version`; `_MIGRATIONS[i]` takes a database from version i to
i + 1, so upgrading is replaying the missing steps in order.

Manifest bodies are stored verbatim (they are at most a few MiB and are served
byte for byte). Blob files live in BlobStore; the `blobs` table records their
size and last access for eviction. Last-access times are kept in memory and
written in batches by `flush_access()`, so a cache hit costs no write.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

_SCHEMA_V1 = """
    CREATE TABLE blobs (
        digest      TEXT PRIMARY KEY,
        size        INTEGER NOT NULL,
        created     REAL NOT NULL,
        last_access REAL NOT NULL
    );
    CREATE INDEX blobs_last_access ON blobs (last_access);
    CREATE TABLE manifests (
        digest      TEXT PRIMARY KEY,
        media_type  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        body        BLOB NOT NULL,
        created     REAL NOT NULL,
        last_access REAL NOT NULL
    );
    CREATE TABLE repository_manifests (
        repository  TEXT NOT NULL,
        digest      TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
        PRIMARY KEY (repository, digest)
    );
    CREATE TABLE tags (
        repository  TEXT NOT NULL,
        tag         TEXT NOT NULL,
        digest      TEXT NOT NULL,
        media_type  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        fetched     REAL NOT NULL,  -- when upstream first gave this digest
        checked     REAL NOT NULL,  -- when upstream last confirmed it
        PRIMARY KEY (repository, tag)
    );
    """

_SCHEMA_V2 = """
    ALTER TABLE tags ADD COLUMN last_access REAL NOT NULL DEFAULT 0;
    UPDATE tags SET last_access = checked;
    CREATE TABLE manifest_refs (
        manifest    TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
        child       TEXT NOT NULL,
        kind        TEXT NOT NULL,  -- 'blob' or 'manifest'
        size        INTEGER NOT NULL,
        PRIMARY KEY (manifest, child)
    );
    CREATE INDEX manifest_refs_child ON manifest_refs (child);
"""


async def _v1(db: aiosqlite.Connection) -> None:
    await _script(db, _SCHEMA_V1)


async def _v2(db: aiosqlite.Connection) -> None:
    """Tag access times, and what each manifest references (for purge/ls)."""
    await _script(db, _SCHEMA_V2)
    async with db.execute("SELECT digest, body FROM manifests") as cur:
        rows = await cur.fetchall()
    for digest, body in rows:
        await _insert_refs(db, digest, bytes(body))


async def _script(db: aiosqlite.Connection, script: str) -> None:
    # executescript would commit; run statements one by one in the open
    # transaction so a migration step is all or nothing.
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)


def manifest_references(body: bytes) -> list[tuple[str, str, int]]:
    """(digest, kind, size) of what a manifest points at: its config and
    layers ('blob'), or an index's manifests ('manifest'). Unparseable
    bodies reference nothing."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    refs: list[tuple[str, str, int]] = []
    groups = (("blob", [doc.get("config")]), ("blob", doc.get("layers")))
    for kind, items in (*groups, ("manifest", doc.get("manifests"))):
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                size = item.get("size")
                refs.append(
                    (item["digest"], kind, size if isinstance(size, int) else 0)
                )
    return refs


async def _insert_refs(db: aiosqlite.Connection, digest: str, body: bytes) -> None:
    await db.executemany(
        "INSERT OR IGNORE INTO manifest_refs (manifest, child, kind, size)"
        " VALUES (?, ?, ?, ?)",
        [
            (digest, child, kind, size)
            for child, kind, size in manifest_references(body)
        ],
    )


# _MIGRATIONS[i] takes the database from version i to i + 1.
_MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [_v1, _v2]
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagRecord:
    repository: str
    tag: str
    digest: str
    media_type: str
    size: int
    fetched: float
    checked: float


class MetadataStore:
    """One aiosqlite connection. `open()` before use, `close()` after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._blob_access: dict[str, float] = {}
        self._manifest_access: dict[str, float] = {}
        self._tag_access: dict[tuple[str, str], float] = {}

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("MetadataStore used before open()")
        return self._db

    async def open(self) -> None:
        """Connect, enable WAL, and migrate the schema to SCHEMA_VERSION.

        Raises RuntimeError if the database is newer than this program.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        try:
            await self._prepare()
        except BaseException:
            await self._db.close()
            self._db = None
            raise

    async def _prepare(self) -> None:
        await self.db.execute("PRAGMA journal_mode = WAL")
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.execute("PRAGMA foreign_keys = ON")
        await self.db.execute("PRAGMA busy_timeout = 5000")
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}; this mirror "
                f"understands up to {SCHEMA_VERSION}"
            )
        for step in range(version, SCHEMA_VERSION):
            await self.db.execute("BEGIN")
            try:
                await _MIGRATIONS[step](self.db)
                await self.db.execute(f"PRAGMA user_version = {step + 1}")
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()

    async def close(self) -> None:
        """Write pending access times and close the connection."""
        if self._db is None:
            return
        try:
            await self.flush_access()
        finally:
            await self._db.close()
            self._db = None

    # --- blobs ----------------------------------------------------------------

    async def add_blob(self, digest: str, size: int, now: float) -> None:
        await self.db.execute(
            "INSERT INTO blobs (digest, size, created, last_access)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET size = excluded.size,"
            " last_access = excluded.last_access",
            (digest, size, now, now),
        )
        await self.db.commit()

    def touch_blob(self, digest: str, now: float) -> None:
        """Note an access; written by the next flush_access()."""
        self._blob_access[digest] = now

    # --- manifests ------------------------------------------------------------

    async def get_manifest(self, digest: str) -> ManifestRecord | None:
        async with self.db.execute(
            "SELECT digest, media_type, body FROM manifests WHERE digest = ?",
            (digest,),
        ) as cur:
            row = await cur.fetchone()
        return ManifestRecord(row[0], row[1], bytes(row[2])) if row else None

    async def put_manifest(
        self, repository: str, digest: str, media_type: str, body: bytes, now: float
    ) -> None:
        await self.db.execute(
            "INSERT INTO manifests (digest, media_type, size, body, created,"
            " last_access) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET last_access = excluded.last_access",
            (digest, media_type, len(body), body, now, now),
        )
        await self.db.execute(
            "INSERT OR IGNORE INTO repository_manifests (repository, digest)"
            " VALUES (?, ?)",
            (repository, digest),
        )
        await _insert_refs(self.db, digest, body)
        await self.db.commit()

    def touch_manifest(self, digest: str, now: float) -> None:
        self._manifest_access[digest] = now

    # --- tags -----------------------------------------------------------------

    async def get_tag(self, repository: str, tag: str) -> TagRecord | None:
        async with self.db.execute(
            "SELECT repository, tag, digest, media_type, size, fetched, checked"
            " FROM tags WHERE repository = ? AND tag = ?",
            (repository, tag),
        ) as cur:
            row = await cur.fetchone()
        return TagRecord(*row) if row else None

    async def put_tag(
        self,
        repository: str,
        tag: str,
        digest: str,
        media_type: str,
        size: int,
        now: float,
    ) -> None:
        """Record that upstream says `tag` is `digest` as of `now`."""
        await self.db.execute(
            "INSERT INTO tags (repository, tag, digest, media_type, size, fetched,"
            " checked, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (repository, tag) DO UPDATE SET"
            " fetched = CASE WHEN digest = excluded.digest THEN fetched"
            "           ELSE excluded.fetched END,"
            " digest = excluded.digest, media_type = excluded.media_type,"
            " size = excluded.size, checked = excluded.checked,"
            " last_access = excluded.last_access",
            (repository, tag, digest, media_type, size, now, now, now),
        )
        await self.db.commit()

    def touch_tag(self, repository: str, tag: str, now: float) -> None:
        self._tag_access[(repository, tag)] = now

    # --- access times ---------------------------------------------------------

    async def flush_access(self) -> None:
        """Write the access times noted since the last flush, in one commit."""
        if not (self._blob_access or self._manifest_access or self._tag_access):
            return
        blobs, self._blob_access = self._blob_access, {}
        manifests, self._manifest_access = self._manifest_access, {}
        tags, self._tag_access = self._tag_access, {}
        await self.db.executemany(
            "UPDATE tags SET last_access = max(last_access, ?)"
            " WHERE repository = ? AND tag = ?",
            [(t, repo, tag) for (repo, tag), t in tags.items()],
        )
        await self.db.executemany(
            "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?",
            [(t, d) for d, t in blobs.items()],
        )
        await self.db.executemany(
            "UPDATE manifests SET last_access = max(last_access, ?) WHERE digest = ?",
            [(t, d) for d, t in manifests.items()],
        )
        await self.db.commit()

    # --- eviction and reconciliation -------------------------------------------

    async def blob_totals(self) -> tuple[int, int]:
        """(number of blobs, their total size in bytes)."""
        async with self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def least_recently_used(self, limit: int) -> list[tuple[str, int]]:
        """(digest, size) of the `limit` blobs accessed longest ago."""
        await self.flush_access()
        async with self.db.execute(
            "SELECT digest, size FROM blobs ORDER BY last_access, digest LIMIT ?",
            (limit,),
        ) as cur:
            return [(str(d), int(n)) for d, n in await cur.fetchall()]

    async def all_blobs(self) -> dict[str, int]:
        """digest -> size of every blob row."""
        async with self.db.execute("SELECT digest, size FROM blobs") as cur:
            return {str(d): int(n) for d, n in await cur.fetchall()}

    async def delete_blobs(self, digests: list[str]) -> None:
        gone = set(digests)
        self._blob_access = {
            d: t for d, t in self._blob_access.items() if d not in gone
        }
        await self.db.executemany(
            "DELETE FROM blobs WHERE digest = ?", [(d,) for d in digests]
        )
        await self.db.commit()
