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

from dataclasses import dataclass
from pathlib import Path

import aiosqlite

_MIGRATIONS: list[str] = [
    """
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
    """,
]
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
            # executescript commits first, so each step is its own transaction.
            await self.db.executescript(
                f"BEGIN; {_MIGRATIONS[step]} PRAGMA user_version = {step + 1}; COMMIT;"
            )

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
            " checked) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (repository, tag) DO UPDATE SET"
            " fetched = CASE WHEN digest = excluded.digest THEN fetched"
            "           ELSE excluded.fetched END,"
            " digest = excluded.digest, media_type = excluded.media_type,"
            " size = excluded.size, checked = excluded.checked",
            (repository, tag, digest, media_type, size, now, now),
        )
        await self.db.commit()

    # --- access times ---------------------------------------------------------

    async def flush_access(self) -> None:
        """Write the access times noted since the last flush, in one commit."""
        if not self._blob_access and not self._manifest_access:
            return
        blobs, self._blob_access = self._blob_access, {}
        manifests, self._manifest_access = self._manifest_access, {}
        await self.db.executemany(
            "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?",
            [(t, d) for d, t in blobs.items()],
        )
        await self.db.executemany(
            "UPDATE manifests SET last_access = max(last_access, ?) WHERE digest = ?",
            [(t, d) for d, t in manifests.items()],
        )
        await self.db.commit()
