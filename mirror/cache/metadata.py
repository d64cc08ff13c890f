"""MetadataStore: manifests, tags and blob bookkeeping in SQLite (aiosqlite).

All SQL lives here, with bound parameters. The database runs in WAL mode so
the operator CLI can read it while the daemon writes. The schema version is
`PRAGMA user_version`; `_MIGRATIONS[i]` takes a database from version i to
i + 1, so upgrading is replaying the missing steps in order.

Manifests, their references and blobs are content-addressed and shared by
every upstream registry. Tags and repository links (which repository a
manifest was fetched through) belong to one registry: they are keyed by
(registry, repository, ...), the registry being the host clients name
(`docker.io`, `ghcr.io`, `registry.corp:5000`).

Manifest bodies are stored verbatim (they are at most a few MiB and are served
byte for byte). Blob files live in BlobStore; the `blobs` table records their
size and last access for eviction. Last-access times are kept in memory and
written in batches by `flush_access()`, so a cache hit costs no write.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from mirror.config import DOCKER_IO
from mirror.values import loads_json

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


# Tags and repository links gain their registry, in their primary keys.
# SQLite cannot change a primary key in place, so each table is rebuilt as
# https://www.sqlite.org/lang_altertable.html#otheralter says: create the new
# table, copy, drop the old one, rename the new one. foreign_keys is ON (a
# PRAGMA cannot change inside the migration's transaction), which is safe
# here: nothing references tags or repository_manifests, so dropping them
# cascades nowhere, and the copy happens before the drop. The copy of the
# links is checked against manifests as it is inserted; a link to a
# manifest that is not there (possible only in a database someone wrote
# with foreign keys off) would fail the migration, so it is left behind:
# ON DELETE CASCADE would have removed it anyway. Until v3 the mirror
# served Docker Hub only, so every existing row is docker.io's (spelled out:
# a migration is history and must not follow a constant that may change).
_SCHEMA_V3 = """
    CREATE TABLE tags_v3 (
        registry    TEXT NOT NULL,
        repository  TEXT NOT NULL,
        tag         TEXT NOT NULL,
        digest      TEXT NOT NULL,
        media_type  TEXT NOT NULL,
        size        INTEGER NOT NULL,
        fetched     REAL NOT NULL,  -- when upstream first gave this digest
        checked     REAL NOT NULL,  -- when upstream last confirmed it
        last_access REAL NOT NULL,
        PRIMARY KEY (registry, repository, tag)
    );
    INSERT INTO tags_v3 (registry, repository, tag, digest, media_type, size,
                         fetched, checked, last_access)
        SELECT 'docker.io', repository, tag, digest, media_type, size,
               fetched, checked, last_access
        FROM tags;
    DROP TABLE tags;
    ALTER TABLE tags_v3 RENAME TO tags;
    CREATE TABLE repository_manifests_v3 (
        registry    TEXT NOT NULL,
        repository  TEXT NOT NULL,
        digest      TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
        PRIMARY KEY (registry, repository, digest)
    );
    INSERT INTO repository_manifests_v3 (registry, repository, digest)
        SELECT 'docker.io', repository, digest FROM repository_manifests
        WHERE digest IN (SELECT digest FROM manifests);
    DROP TABLE repository_manifests;
    ALTER TABLE repository_manifests_v3 RENAME TO repository_manifests;
    -- Referrers lists (OCI 1.1), as upstream answered them: status 200
    -- with an image index, or 404 (no referrers API: clients use tags).
    CREATE TABLE referrers (
        registry      TEXT NOT NULL,
        repository    TEXT NOT NULL,
        subject       TEXT NOT NULL,
        artifact_type TEXT NOT NULL,  -- the filter asked for, '' for none
        status        INTEGER NOT NULL,
        media_type    TEXT NOT NULL,
        body          BLOB NOT NULL,
        filters       TEXT,  -- OCI-Filters-Applied, as upstream sent it
        checked       REAL NOT NULL,  -- when upstream last answered
        PRIMARY KEY (registry, repository, subject, artifact_type)
    );
    -- The cascade from a deleted manifest looks its links up by digest.
    CREATE INDEX repository_manifests_digest ON repository_manifests (digest);
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


async def _v3(db: aiosqlite.Connection) -> None:
    """Tags and repository links keyed by registry; old rows are docker.io's."""
    await _script(db, _SCHEMA_V3)


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
        doc = loads_json(body)
    except ValueError:  # not JSON, or nested too deeply to be a manifest
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
_MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [
    _v1,
    _v2,
    _v3,
]
SCHEMA_VERSION = len(_MIGRATIONS)
# The database's file name inside cache.dir.
DATABASE_NAME = "mirror.db"


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ReferrersRecord:
    """A referrers answer as upstream gave it (status 200 or 404)."""

    status: int
    media_type: str
    body: bytes
    filters: str | None
    checked: float


@dataclass(frozen=True, slots=True)
class TagRecord:
    registry: str  # "docker.io", "ghcr.io", "registry.corp:5000"
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
        self._tag_access: dict[tuple[str, str, str], float] = {}

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

    async def declared_size(self, digest: str) -> int | None:
        """The size a cached manifest declares for blob `digest`, if any (a
        hint only: the download itself is checked against the digest)."""
        async with self.db.execute(
            "SELECT max(size) FROM manifest_refs WHERE child = ? AND kind = 'blob'",
            (digest,),
        ) as cur:
            row = await cur.fetchone()
        size = row[0] if row else None
        return int(size) if isinstance(size, int) and size > 0 else None

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
        self,
        registry: str,
        repository: str,
        digest: str,
        media_type: str,
        body: bytes,
        now: float,
    ) -> None:
        """Store a manifest (shared by every registry) and link it to
        `repository` of `registry`, which it was fetched through."""
        await self.db.execute(
            "INSERT INTO manifests (digest, media_type, size, body, created,"
            " last_access) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET last_access = excluded.last_access",
            (digest, media_type, len(body), body, now, now),
        )
        await self.db.execute(
            "INSERT OR IGNORE INTO repository_manifests (registry, repository,"
            " digest) VALUES (?, ?, ?)",
            (registry, repository, digest),
        )
        await _insert_refs(self.db, digest, body)
        await self.db.commit()

    def touch_manifest(self, digest: str, now: float) -> None:
        self._manifest_access[digest] = now

    # --- tags -----------------------------------------------------------------

    async def get_tag(
        self, registry: str, repository: str, tag: str
    ) -> TagRecord | None:
        async with self.db.execute(
            "SELECT registry, repository, tag, digest, media_type, size, fetched,"
            " checked FROM tags WHERE registry = ? AND repository = ? AND tag = ?",
            (registry, repository, tag),
        ) as cur:
            row = await cur.fetchone()
        return TagRecord(*row) if row else None

    async def put_tag(
        self,
        registry: str,
        repository: str,
        tag: str,
        digest: str,
        media_type: str,
        size: int,
        now: float,
    ) -> None:
        """Record that `registry` says `tag` is `digest` as of `now`."""
        await self.db.execute(
            "INSERT INTO tags (registry, repository, tag, digest, media_type, size,"
            " fetched, checked, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (registry, repository, tag) DO UPDATE SET"
            " fetched = CASE WHEN digest = excluded.digest THEN fetched"
            "           ELSE excluded.fetched END,"
            " digest = excluded.digest, media_type = excluded.media_type,"
            " size = excluded.size, checked = excluded.checked,"
            " last_access = excluded.last_access",
            (registry, repository, tag, digest, media_type, size, now, now, now),
        )
        await self.db.commit()

    def touch_tag(self, registry: str, repository: str, tag: str, now: float) -> None:
        """Note an access; written by the next flush_access()."""
        self._tag_access[(registry, repository, tag)] = now

    # --- referrers --------------------------------------------------------------

    async def get_referrers(
        self, registry: str, repository: str, subject: str, artifact_type: str
    ) -> ReferrersRecord | None:
        """The last referrers answer for `subject` (filtered by
        `artifact_type`, '' for none), if any."""
        async with self.db.execute(
            "SELECT status, media_type, body, filters, checked FROM referrers"
            " WHERE registry = ? AND repository = ? AND subject = ?"
            " AND artifact_type = ?",
            (registry, repository, subject, artifact_type),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return ReferrersRecord(int(row[0]), str(row[1]), bytes(row[2]), row[3], row[4])

    async def put_referrers(
        self,
        registry: str,
        repository: str,
        subject: str,
        artifact_type: str,
        record: ReferrersRecord,
    ) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO referrers (registry, repository, subject,"
            " artifact_type, status, media_type, body, filters, checked)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                registry,
                repository,
                subject,
                artifact_type,
                record.status,
                record.media_type,
                record.body,
                record.filters,
                record.checked,
            ),
        )
        await self.db.commit()

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
            " WHERE registry = ? AND repository = ? AND tag = ?",
            [(t, reg, repo, tag) for (reg, repo, tag), t in tags.items()],
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

    async def data_version(self) -> int:
        """Changes whenever another connection (the operator CLI) commits."""
        async with self.db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

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

    # --- operator queries: mirror status, ls, purge ----------------------------
    #
    # Reads that take several statements run in one read transaction (a WAL
    # snapshot), so a daemon writing meanwhile cannot make them disagree.
    # Purges run in one write transaction (BEGIN IMMEDIATE): the daemon's
    # writes wait for it (busy_timeout), so nothing can start referencing a
    # blob between the decision to remove it and the removal.

    async def cache_stats(self) -> CacheStats:
        """Counts, sizes and the blob access range, as one snapshot.

        A repository is a (registry, repository) pair with a tag or a link;
        `registries` breaks the counts down, docker.io first.
        """
        await self.flush_access()
        async with self._snapshot():
            async with self.db.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(last_access),"
                " max(last_access) FROM blobs"
            ) as cur:
                blob_row = await cur.fetchone()
            async with self.db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM manifests"
            ) as cur:
                manifest_row = await cur.fetchone()
            async with self.db.execute(
                "SELECT registry, count(DISTINCT repository), count(tag) FROM ("
                "  SELECT registry, repository, tag FROM tags"
                "  UNION ALL SELECT registry, repository, NULL"
                "  FROM repository_manifests)"
                " GROUP BY registry"
            ) as cur:
                registries = sorted(
                    (
                        RegistryCounts(str(r[0]), int(r[1]), int(r[2]))
                        for r in await cur.fetchall()
                    ),
                    key=lambda c: registry_order(c.registry),
                )
        if not (blob_row and manifest_row):
            raise RuntimeError("an aggregate query returned no row")
        return CacheStats(
            blobs=int(blob_row[0]),
            blob_bytes=int(blob_row[1]),
            oldest_access=None if blob_row[2] is None else float(blob_row[2]),
            newest_access=None if blob_row[3] is None else float(blob_row[3]),
            manifests=int(manifest_row[0]),
            manifest_bytes=int(manifest_row[1]),
            tags=sum(c.tags for c in registries),
            repositories=sum(c.repositories for c in registries),
            registries=registries,
        )

    async def repositories(self) -> list[RepositorySummary]:
        """Every repository with a tag or a manifest in the cache, by
        registry (docker.io first, then hosts by name) and name.

        `size` adds up the distinct blobs its manifests reference (following
        indexes to the child manifests that are cached); `cached` the part
        of that which is in the store. `last_pulled` is the latest access of
        its tags or manifests.
        """
        await self.flush_access()
        async with self._snapshot():
            async with self.db.execute(
                "WITH RECURSIVE"
                " roots(registry, repository, digest) AS ("
                "   SELECT registry, repository, digest FROM tags"
                "   UNION SELECT registry, repository, digest"
                "   FROM repository_manifests),"
                " reach(registry, repository, digest) AS ("
                "   SELECT registry, repository, digest FROM roots"
                "   UNION SELECT reach.registry, reach.repository, r.child"
                "   FROM manifest_refs r JOIN reach ON r.manifest = reach.digest"
                "   WHERE r.kind = 'manifest'),"
                " refs(registry, repository, digest, size) AS ("
                "   SELECT reach.registry, reach.repository, r.child, max(r.size)"
                "   FROM reach JOIN manifest_refs r ON r.manifest = reach.digest"
                "   WHERE r.kind = 'blob'"
                "   GROUP BY reach.registry, reach.repository, r.child)"
                " SELECT refs.registry, refs.repository, sum(refs.size),"
                "  coalesce(sum(b.size), 0), count(*), count(b.digest)"
                " FROM refs LEFT JOIN blobs b ON b.digest = refs.digest"
                " GROUP BY refs.registry, refs.repository"
            ) as cur:
                sizes = {
                    (str(r[0]), str(r[1])): tuple(map(int, r[2:]))
                    for r in await cur.fetchall()
                }
            async with self.db.execute(
                "SELECT registry, repository, count(*), max(last_access) FROM tags"
                " GROUP BY registry, repository"
            ) as cur:
                tags = {
                    (str(r[0]), str(r[1])): (int(r[2]), float(r[3]))
                    for r in await cur.fetchall()
                }
            async with self.db.execute(
                "SELECT rm.registry, rm.repository, count(*), max(m.last_access)"
                " FROM repository_manifests rm JOIN manifests m ON m.digest = rm.digest"
                " GROUP BY rm.registry, rm.repository"
            ) as cur:
                links = {
                    (str(r[0]), str(r[1])): (int(r[2]), float(r[3]))
                    for r in await cur.fetchall()
                }
        summaries = []
        for key in sorted({*tags, *links}, key=lambda k: (registry_order(k[0]), k[1])):
            tag_count, tag_access = tags.get(key, (0, 0.0))
            manifest_count, manifest_access = links.get(key, (0, 0.0))
            size, cached, blobs, cached_blobs = sizes.get(key, (0, 0, 0, 0))
            summaries.append(
                RepositorySummary(
                    registry=key[0],
                    repository=key[1],
                    tags=tag_count,
                    manifests=manifest_count,
                    size=size,
                    cached=cached,
                    blobs=blobs,
                    cached_blobs=cached_blobs,
                    last_pulled=max(tag_access, manifest_access) or None,
                )
            )
        return summaries

    async def repository_tags(self, registry: str, repository: str) -> list[TagSummary]:
        """The tags of `repository` of `registry`, by name, with their image
        sizes.

        `size` adds up the distinct blobs of the tag's manifest and, for an
        index, of its child manifests that are cached (`platforms` says how
        many of how many); `cached` the part of that which is in the store.
        `manifest_cached` is false when only the tag's digest is known (a
        HEAD resolved it and no GET followed yet).
        """
        await self.flush_access()
        key = (registry, repository)
        async with self._snapshot():
            async with self.db.execute(
                "SELECT t.tag, t.digest, t.media_type, t.fetched, t.checked,"
                " t.last_access, m.digest IS NOT NULL"
                " FROM tags t LEFT JOIN manifests m ON m.digest = t.digest"
                " WHERE t.registry = ? AND t.repository = ? ORDER BY t.tag",
                key,
            ) as cur:
                rows = await cur.fetchall()
            async with self.db.execute(
                "WITH RECURSIVE"
                " roots(tag, digest) AS ("
                "   SELECT tag, digest FROM tags"
                "   WHERE registry = ? AND repository = ?),"
                " reach(tag, digest) AS ("
                "   SELECT tag, digest FROM roots"
                "   UNION SELECT reach.tag, r.child"
                "   FROM manifest_refs r JOIN reach ON r.manifest = reach.digest"
                "   WHERE r.kind = 'manifest'),"
                " refs(tag, digest, size) AS ("
                "   SELECT reach.tag, r.child, max(r.size)"
                "   FROM reach JOIN manifest_refs r ON r.manifest = reach.digest"
                "   WHERE r.kind = 'blob' GROUP BY reach.tag, r.child)"
                " SELECT refs.tag, sum(refs.size), coalesce(sum(b.size), 0),"
                "  count(*), count(b.digest)"
                " FROM refs LEFT JOIN blobs b ON b.digest = refs.digest"
                " GROUP BY refs.tag",
                key,
            ) as cur:
                sizes = {
                    str(r[0]): tuple(map(int, r[1:])) for r in await cur.fetchall()
                }
            async with self.db.execute(
                "SELECT t.tag, count(*), count(m.digest)"
                " FROM tags t JOIN manifest_refs r"
                "  ON r.manifest = t.digest AND r.kind = 'manifest'"
                " LEFT JOIN manifests m ON m.digest = r.child"
                " WHERE t.registry = ? AND t.repository = ? GROUP BY t.tag",
                key,
            ) as cur:
                platforms = {
                    str(r[0]): (int(r[2]), int(r[1])) for r in await cur.fetchall()
                }
        summaries = []
        for tag, digest, media_type, fetched, checked, last_access, known in rows:
            size, cached, blobs, cached_blobs = sizes.get(tag, (0, 0, 0, 0))
            summaries.append(
                TagSummary(
                    registry=registry,
                    repository=repository,
                    tag=str(tag),
                    digest=str(digest),
                    media_type=str(media_type),
                    manifest_cached=bool(known),
                    platforms=platforms.get(tag),
                    size=size,
                    cached=cached,
                    blobs=blobs,
                    cached_blobs=cached_blobs,
                    fetched=float(fetched),
                    checked=float(checked),
                    last_pulled=float(last_access),
                )
            )
        return summaries

    async def purge_repository(
        self,
        registry: str,
        repository: str,
        tag: str | None = None,
        *,
        dry_run: bool = False,
        before_commit: Callable[[list[str]], None] | None = None,
    ) -> PurgeRecord:
        """Forget a repository of `registry`, or one of its tags, then
        collect garbage. The same repository name of another registry is
        not touched.

        Without `tag`: its tags and its repository links go. With `tag`: the
        tag goes, and so do the repository's links to the manifests that tag
        reaches (an index and its children) unless another of its tags still
        reaches them. Then manifests and blobs nothing needs any more go (see
        `_collect_garbage`). `before_commit(digests)` is called with the blob
        digests whose rows are being deleted, inside the transaction, so it
        can take their files out of the store before anything can start
        using them again. `dry_run` rolls everything back and returns what
        would have gone. Raises sqlite3.Error (e.g. the database stayed
        locked for longer than busy_timeout).
        """
        repo = (registry, repository)

        async def roots() -> tuple[list[TagKey], list[LinkKey]]:
            if tag is None:
                # Its referrers lists go too (they are no roots: nothing to
                # report, and a dry run rolls this back with the rest).
                await self.db.execute(
                    "DELETE FROM referrers WHERE registry = ? AND repository = ?",
                    repo,
                )
                tags = await self._fetch(
                    "SELECT registry, repository, tag, digest FROM tags"
                    " WHERE registry = ? AND repository = ? ORDER BY tag",
                    repo,
                )
                links = await self._fetch(
                    "SELECT registry, repository, digest FROM repository_manifests"
                    " WHERE registry = ? AND repository = ? ORDER BY digest",
                    repo,
                )
            else:
                tags = await self._fetch(
                    "SELECT registry, repository, tag, digest FROM tags"
                    " WHERE registry = ? AND repository = ? AND tag = ?",
                    (*repo, tag),
                )
                links = await self._fetch(
                    "WITH RECURSIVE"
                    " tree(digest) AS ("
                    "   SELECT digest FROM tags"
                    "   WHERE registry = ? AND repository = ? AND tag = ?"
                    "   UNION SELECT r.child FROM manifest_refs r"
                    "   JOIN tree ON r.manifest = tree.digest"
                    "   WHERE r.kind = 'manifest'),"
                    " keep(digest) AS ("
                    "   SELECT digest FROM tags"
                    "   WHERE registry = ? AND repository = ? AND tag != ?"
                    "   UNION SELECT r.child FROM manifest_refs r"
                    "   JOIN keep ON r.manifest = keep.digest"
                    "   WHERE r.kind = 'manifest')"
                    " SELECT registry, repository, digest FROM repository_manifests"
                    " WHERE registry = ? AND repository = ?"
                    "  AND digest IN (SELECT digest FROM tree)"
                    "  AND digest NOT IN (SELECT digest FROM keep)"
                    " ORDER BY digest",
                    (*repo, tag, *repo, tag, *repo),
                )
            return _tag_keys(tags), _link_keys(links)

        return await self._purge(roots, None, dry_run, before_commit)

    async def purge_older_than(
        self,
        cutoff: float,
        *,
        dry_run: bool = False,
        before_commit: Callable[[list[str]], None] | None = None,
    ) -> PurgeRecord:
        """Forget what was last used before `cutoff` (seconds since the epoch).

        Tags whose last access is older, repository links to manifests whose
        last access is older, and blobs whose last access is older go, in
        every registry; then garbage is collected as for `purge_repository`,
        whose arguments and errors these are.
        """

        async def roots() -> tuple[list[TagKey], list[LinkKey]]:
            await self.db.execute("DELETE FROM referrers WHERE checked < ?", (cutoff,))
            tags = await self._fetch(
                "SELECT registry, repository, tag, digest FROM tags"
                " WHERE last_access < ? ORDER BY registry, repository, tag",
                (cutoff,),
            )
            links = await self._fetch(
                "SELECT rm.registry, rm.repository, rm.digest"
                " FROM repository_manifests rm"
                " JOIN manifests m ON m.digest = rm.digest WHERE m.last_access < ?"
                " ORDER BY rm.registry, rm.repository, rm.digest",
                (cutoff,),
            )
            return _tag_keys(tags), _link_keys(links)

        return await self._purge(roots, cutoff, dry_run, before_commit)

    async def _purge(
        self,
        roots: Callable[[], Awaitable[tuple[list[TagKey], list[LinkKey]]]],
        cutoff: float | None,
        dry_run: bool,
        before_commit: Callable[[list[str]], None] | None,
    ) -> PurgeRecord:
        await self.flush_access()
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            tags, links = await roots()
            await self.db.executemany(
                "DELETE FROM tags WHERE registry = ? AND repository = ? AND tag = ?",
                [(g, r, t) for g, r, t, _d in tags],
            )
            await self.db.executemany(
                "DELETE FROM repository_manifests"
                " WHERE registry = ? AND repository = ? AND digest = ?",
                links,
            )
            manifests, blobs = await self._collect_garbage(cutoff)
            digests = [d for d, _size in blobs]
            if dry_run:
                await self.db.rollback()
            else:
                if before_commit is not None:
                    before_commit(digests)
                await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        if not dry_run:
            gone = set(digests)
            self._blob_access = {
                d: t for d, t in self._blob_access.items() if d not in gone
            }
        return PurgeRecord(tags=tags, links=links, manifests=manifests, blobs=blobs)

    async def _collect_garbage(
        self, cutoff: float | None
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
        """Delete what no root needs; in the caller's write transaction.

        A root is a tag or a repository link (`repository_manifests`), of
        any registry: manifests are shared, so one registry's root keeps a
        manifest another registry's purge let go. A manifest stays if a root
        reaches it, directly or through an index.
        A blob goes if a manifest being deleted referenced it and no
        remaining manifest does, or if its last access is before `cutoff`.
        Blobs no manifest ever referenced are left to eviction. Returns the
        deleted manifests (digest, media type, size) and blobs (digest, size).
        """
        await self.db.execute(_DEAD_MANIFESTS_VIEW)
        manifests = [
            (str(d), str(t), int(n))
            for d, t, n in await self._fetch(
                "SELECT digest, media_type, size FROM manifests"
                " WHERE digest IN (SELECT digest FROM temp.dead_manifests)"
                " ORDER BY digest"
            )
        ]
        blobs = {
            str(d): int(n)
            for d, n in await self._fetch(
                "SELECT b.digest, b.size FROM blobs b"
                " WHERE b.digest IN (SELECT r.child FROM manifest_refs r"
                "   WHERE r.manifest IN (SELECT digest FROM temp.dead_manifests))"
                " AND NOT EXISTS (SELECT 1 FROM manifest_refs r"
                "   WHERE r.child = b.digest AND r.manifest NOT IN"
                "   (SELECT digest FROM temp.dead_manifests))"
            )
        }
        if cutoff is not None:
            for d, n in await self._fetch(
                "SELECT digest, size FROM blobs WHERE last_access < ?", (cutoff,)
            ):
                blobs[str(d)] = int(n)
        # Deleting a manifest cascades to its references.
        await self.db.executemany(
            "DELETE FROM manifests WHERE digest = ?", [(d,) for d, _t, _n in manifests]
        )
        await self.db.executemany(
            "DELETE FROM blobs WHERE digest = ?", [(d,) for d in blobs]
        )
        return manifests, sorted(blobs.items())

    async def _fetch(
        self, sql: str, params: tuple[object, ...] = ()
    ) -> list[tuple[Any, ...]]:
        async with self.db.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[None]:
        """One read transaction: the statements inside see one snapshot."""
        await self.db.execute("BEGIN")
        try:
            yield
        finally:
            await self.db.rollback()


# Manifests no root reaches. A root is a tag or a repository link, of any
# registry (manifests are shared, so the registry does not matter here); a
# manifest is reached from a root directly or through an index (recursively). UNION,
# not UNION ALL, makes a reference cycle terminate. A per-connection view, so
# the walk is written once and evaluated inside the caller's transaction.
_DEAD_MANIFESTS_VIEW = """
    CREATE TEMP VIEW IF NOT EXISTS dead_manifests (digest) AS
    WITH RECURSIVE
    roots(digest) AS (
        SELECT digest FROM tags UNION SELECT digest FROM repository_manifests
    ),
    reach(digest) AS (
        SELECT digest FROM roots
        UNION
        SELECT r.child FROM manifest_refs r JOIN reach ON r.manifest = reach.digest
        WHERE r.kind = 'manifest'
    )
    SELECT digest FROM manifests WHERE digest NOT IN (SELECT digest FROM reach)
"""


def registry_order(registry: str) -> tuple[bool, str]:
    """Sort key for registries: docker.io first, then hosts by name."""
    return (registry != DOCKER_IO, registry)


# A tag as a purge reports it: (registry, repository, tag, digest); a
# repository link: (registry, repository, manifest digest).
TagKey = tuple[str, str, str, str]
LinkKey = tuple[str, str, str]


def _tag_keys(rows: list[tuple[Any, ...]]) -> list[TagKey]:
    return [(str(g), str(r), str(t), str(d)) for g, r, t, d in rows]


def _link_keys(rows: list[tuple[Any, ...]]) -> list[LinkKey]:
    return [(str(g), str(r), str(d)) for g, r, d in rows]


@dataclass(frozen=True, slots=True)
class CacheStats:
    blobs: int
    blob_bytes: int
    oldest_access: float | None  # of a blob; None when there are none
    newest_access: float | None
    manifests: int
    manifest_bytes: int
    tags: int
    repositories: int  # distinct (registry, repository)
    registries: list[RegistryCounts]  # docker.io first, then by host


@dataclass(frozen=True, slots=True)
class RegistryCounts:
    """What the cache holds of one registry (a registry with neither tags
    nor links is not listed)."""

    registry: str
    repositories: int
    tags: int


@dataclass(frozen=True, slots=True)
class RepositorySummary:
    registry: str
    repository: str
    tags: int
    manifests: int  # linked to it: fetched through this repository
    size: int  # bytes of the distinct blobs its cached manifests reference
    cached: int  # bytes of those in the store
    blobs: int
    cached_blobs: int
    last_pulled: float | None


@dataclass(frozen=True, slots=True)
class TagSummary:
    registry: str
    repository: str
    tag: str
    digest: str
    media_type: str
    manifest_cached: bool
    platforms: tuple[int, int] | None  # an index: (children cached, children)
    size: int
    cached: int
    blobs: int
    cached_blobs: int
    fetched: float
    checked: float
    last_pulled: float


@dataclass(frozen=True, slots=True)
class PurgeRecord:
    """What a purge removed (or, dry, would remove)."""

    tags: list[TagKey]  # registry, repository, tag, digest
    links: list[LinkKey]  # registry, repository, manifest digest
    manifests: list[tuple[str, str, int]]  # digest, media type, size
    blobs: list[tuple[str, int]]  # digest, size

    @property
    def empty(self) -> bool:
        return not (self.tags or self.links or self.manifests or self.blobs)
