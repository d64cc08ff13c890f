"""Unit tests for mirror.cache.metadata against a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.metadata import (
    SCHEMA_VERSION,
    ManifestRecord,
    MetadataStore,
    ReferrersRecord,
    TagRecord,
)

T0 = 1_700_000_000.0
HUB = "docker.io"
GHCR = "ghcr.io"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
MEDIA = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# A schema-v2 database made by the code before registries (see its header).
V2_DUMP = Path(__file__).parent / "data" / "schema_v2.sql"
# Deliberately odd JSON: whitespace, key order and a trailing newline must survive.
BODY = b'{ "schemaVersion":2,\n  "z":1, "a":"\xc3\xa9" }\n'


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mirror.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[MetadataStore]:
    meta = MetadataStore(db_path)
    await meta.open()
    try:
        yield meta
    finally:
        await meta.close()


@contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection: sees only what was committed."""
    with closing(sqlite3.connect(path)) as conn:
        yield conn


def scalar(path: Path, sql: str, *params: object) -> object:
    with reader(path) as conn:
        row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


# --- schema -----------------------------------------------------------------------


def test_constructor_does_no_io(db_path: Path) -> None:
    MetadataStore(db_path)
    assert not db_path.parent.exists()


def test_use_before_open_is_an_error(db_path: Path) -> None:
    with pytest.raises(RuntimeError, match="before open"):
        _ = MetadataStore(db_path).db


async def test_open_creates_schema(store: MetadataStore, db_path: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION
    with reader(db_path) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {"blobs", "manifests", "repository_manifests", "tags"} <= tables


async def test_wal_mode(store: MetadataStore, db_path: Path) -> None:
    assert scalar(db_path, "PRAGMA journal_mode") == "wal"


async def test_reopen_is_idempotent(db_path: Path) -> None:
    first = MetadataStore(db_path)
    await first.open()
    await first.put_manifest(HUB, "library/alpine", DIGEST_A, MEDIA, BODY, T0)
    await first.close()

    second = MetadataStore(db_path)
    await second.open()
    try:
        assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION
        record = await second.get_manifest(DIGEST_A)
        assert record == ManifestRecord(DIGEST_A, MEDIA, BODY)
    finally:
        await second.close()


async def test_close_twice_is_harmless(db_path: Path) -> None:
    meta = MetadataStore(db_path)
    await meta.open()
    await meta.close()
    await meta.close()
    with pytest.raises(RuntimeError, match="before open"):
        _ = meta.db


def _make_future_db(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    _make_future_db(db_path)
    meta = MetadataStore(db_path)
    try:
        with pytest.raises(
            RuntimeError,
            match=f"schema version {SCHEMA_VERSION + 1}; this mirror understands "
            f"up to {SCHEMA_VERSION}",
        ):
            await meta.open()
    finally:
        await meta.close()  # whatever open() left behind
    # Refusing must not touch the database.
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION + 1
    assert scalar(db_path, "SELECT count(*) FROM sqlite_master") == 0


async def test_refused_open_closes_its_connection(db_path: Path) -> None:
    _make_future_db(db_path)
    meta = MetadataStore(db_path)
    try:
        with pytest.raises(RuntimeError, match="schema version"):
            await meta.open()
        with pytest.raises(RuntimeError, match="before open"):
            _ = meta.db
    finally:
        await meta.close()  # keep the leak out of other tests


# --- migration from schema v2 (before registries) ----------------------------------


def load_v2(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db_path)) as conn:
        conn.executescript(V2_DUMP.read_text())


def dump(db_path: Path) -> list[str]:
    """Schema and rows, as text: equal dumps are equal databases."""
    with reader(db_path) as conn:
        return [
            *conn.iterdump(),
            f"user_version {scalar(db_path, 'PRAGMA user_version')}",
        ]


def rows(db_path: Path, sql: str) -> set[tuple[Any, ...]]:
    with reader(db_path) as conn:
        return {tuple(row) for row in conn.execute(sql)}


_TAG_COLUMNS = (
    "repository, tag, digest, media_type, size, fetched, checked, last_access"
)
_UNCHANGED = (
    "SELECT * FROM manifests",
    "SELECT * FROM manifest_refs",
    "SELECT * FROM blobs",
)


async def test_v2_database_migrates_with_every_row_docker_io_s(db_path: Path) -> None:
    load_v2(db_path)
    assert scalar(db_path, "PRAGMA user_version") == 2
    v2_tags = rows(db_path, f"SELECT {_TAG_COLUMNS} FROM tags")  # noqa: S608
    v2_links = rows(db_path, "SELECT repository, digest FROM repository_manifests")
    v2_unchanged = [rows(db_path, sql) for sql in _UNCHANGED]
    assert len(v2_tags) == 4
    assert len(v2_links) == 6
    assert all(v2_unchanged)

    store = MetadataStore(db_path)
    await store.open()
    try:
        for repository, tag, *record, _last_access in v2_tags:
            assert await store.get_tag(HUB, repository, tag) == TagRecord(
                HUB, repository, tag, *record
            )
        for digest, media_type, _size, body, _created, _access in v2_unchanged[0]:
            assert await store.get_manifest(digest) == ManifestRecord(
                digest, media_type, body
            )
    finally:
        await store.close()

    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION
    assert rows(db_path, f"SELECT registry, {_TAG_COLUMNS} FROM tags") == {  # noqa: S608
        (HUB, *row) for row in v2_tags
    }
    assert rows(db_path, "SELECT * FROM repository_manifests") == {
        (HUB, *row) for row in v2_links
    }
    assert [rows(db_path, sql) for sql in _UNCHANGED] == v2_unchanged
    # What the dump's recipe did, spelled out: a re-confirmed tag kept when
    # it was first fetched, a touched tag and blob kept their access times.
    assert (HUB, "library/alpine", "latest", T0 + 10, T0 + 20) in rows(
        db_path, "SELECT registry, repository, tag, fetched, checked FROM tags"
    )
    assert scalar(db_path, "SELECT last_access FROM tags WHERE tag = '3'") == T0 + 100
    assert scalar(db_path, "SELECT max(last_access) FROM blobs") == T0 + 110
    with reader(db_path) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (fk,) = conn.execute("PRAGMA foreign_key_list(repository_manifests)")
    assert (fk[2], fk[3], fk[4], fk[6]) == ("manifests", "digest", "digest", "CASCADE")


async def test_second_open_of_a_migrated_database_changes_nothing(
    db_path: Path,
) -> None:
    load_v2(db_path)
    store = MetadataStore(db_path)
    await store.open()
    await store.close()
    migrated = dump(db_path)
    assert migrated[-1] == f"user_version {SCHEMA_VERSION}"

    await store.open()
    await store.close()
    assert dump(db_path) == migrated


async def test_migrated_database_keeps_registries_apart(db_path: Path) -> None:
    load_v2(db_path)
    store = MetadataStore(db_path)
    await store.open()
    try:
        hub = await store.get_tag(HUB, "library/alpine", "latest")
        assert hub is not None
        await store.put_tag(GHCR, "library/alpine", "latest", DIGEST_B, MEDIA, 9, T0)
        assert await store.get_tag(HUB, "library/alpine", "latest") == hub
        assert await store.get_tag(GHCR, "library/alpine", "latest") == TagRecord(
            GHCR, "library/alpine", "latest", DIGEST_B, MEDIA, 9, T0, T0
        )
        await store.put_manifest(GHCR, "library/alpine", hub.digest, MEDIA, b"{}", T0)
        names = [(r.registry, r.repository) for r in await store.repositories()]
        assert names[-1] == (GHCR, "library/alpine")
        assert (HUB, "library/alpine") in names
        stats = await store.cache_stats()
        assert (stats.tags, stats.repositories) == (5, 6)
    finally:
        await store.close()
    # Deleting a manifest still cascades to every registry's links to it.
    with reader(db_path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM manifests WHERE digest = ?", (hub.digest,))
        left = conn.execute(
            "SELECT count(*) FROM repository_manifests WHERE digest = ?",
            (hub.digest,),
        ).fetchone()
    assert left == (0,)


async def test_a_failed_migration_leaves_the_v2_database_as_it_was(
    db_path: Path,
) -> None:
    load_v2(db_path)
    # Taking the name of the index v3 creates last makes its final statement
    # fail, after both tables were rebuilt.
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE INDEX repository_manifests_digest ON blobs (size)")
        conn.commit()
    before = dump(db_path)
    assert before[-1] == "user_version 2"

    store = MetadataStore(db_path)
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        await store.open()
    await store.close()

    assert dump(db_path) == before
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DROP INDEX repository_manifests_digest")
        conn.commit()
    await store.open()
    await store.close()
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION


# --- manifests --------------------------------------------------------------------


async def test_manifest_round_trip_is_byte_exact(store: MetadataStore) -> None:
    await store.put_manifest(HUB, "library/alpine", DIGEST_A, MEDIA, BODY, T0)
    record = await store.get_manifest(DIGEST_A)
    assert record is not None
    assert record.body == BODY
    assert type(record.body) is bytes
    assert record.media_type == MEDIA
    assert record.digest == DIGEST_A


async def test_missing_manifest_is_none(store: MetadataStore) -> None:
    assert await store.get_manifest(DIGEST_B) is None


async def test_manifest_rows(store: MetadataStore, db_path: Path) -> None:
    await store.put_manifest(HUB, "library/alpine", DIGEST_A, MEDIA, BODY, T0)
    await store.put_manifest(HUB, "mirror/alpine", DIGEST_A, MEDIA, BODY, T0 + 5)
    with reader(db_path) as conn:
        row = conn.execute(
            "SELECT size, created, last_access FROM manifests WHERE digest = ?",
            (DIGEST_A,),
        ).fetchone()
        repos = sorted(
            r[0]
            for r in conn.execute(
                "SELECT repository FROM repository_manifests WHERE digest = ?",
                (DIGEST_A,),
            )
        )
    assert row == (len(BODY), T0, T0 + 5)
    assert repos == ["library/alpine", "mirror/alpine"]


# --- tags -------------------------------------------------------------------------


async def test_missing_tag_is_none(store: MetadataStore) -> None:
    assert await store.get_tag(HUB, "library/alpine", "latest") is None


async def test_put_and_get_tag(store: MetadataStore) -> None:
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    assert await store.get_tag(HUB, "library/alpine", "latest") == TagRecord(
        HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0, T0
    )
    assert await store.get_tag(HUB, "library/alpine", "3.19") is None
    assert await store.get_tag(HUB, "library/busybox", "latest") is None


async def test_same_digest_keeps_fetched_and_updates_checked(
    store: MetadataStore,
) -> None:
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0 + 60)
    tag = await store.get_tag(HUB, "library/alpine", "latest")
    assert tag is not None
    assert tag.fetched == T0
    assert tag.checked == T0 + 60


async def test_moved_tag_resets_fetched(store: MetadataStore) -> None:
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0 + 10)
    other = "application/vnd.docker.distribution.manifest.v2+json"
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_B, other, 456, T0 + 60)
    assert await store.get_tag(HUB, "library/alpine", "latest") == TagRecord(
        HUB, "library/alpine", "latest", DIGEST_B, other, 456, T0 + 60, T0 + 60
    )


async def test_tags_are_per_repository(store: MetadataStore) -> None:
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 1, T0)
    await store.put_tag(HUB, "library/busybox", "latest", DIGEST_B, MEDIA, 2, T0 + 1)
    alpine = await store.get_tag(HUB, "library/alpine", "latest")
    busybox = await store.get_tag(HUB, "library/busybox", "latest")
    assert alpine is not None
    assert busybox is not None
    assert (alpine.digest, busybox.digest) == (DIGEST_A, DIGEST_B)


async def test_tags_of_two_registries_are_independent(store: MetadataStore) -> None:
    await store.put_tag(HUB, "team/app", "1", DIGEST_A, MEDIA, 1, T0)
    await store.put_tag(GHCR, "team/app", "1", DIGEST_B, MEDIA, 2, T0 + 1)
    assert await store.get_tag(HUB, "team/app", "1") == TagRecord(
        HUB, "team/app", "1", DIGEST_A, MEDIA, 1, T0, T0
    )
    assert await store.get_tag(GHCR, "team/app", "1") == TagRecord(
        GHCR, "team/app", "1", DIGEST_B, MEDIA, 2, T0 + 1, T0 + 1
    )
    assert await store.get_tag("quay.io", "team/app", "1") is None
    # Moving one registry's tag leaves the other's alone.
    await store.put_tag(GHCR, "team/app", "1", DIGEST_A, MEDIA, 1, T0 + 9)
    hub = await store.get_tag(HUB, "team/app", "1")
    ghcr = await store.get_tag(GHCR, "team/app", "1")
    assert hub is not None
    assert ghcr is not None
    assert (hub.fetched, hub.checked) == (T0, T0)
    assert (ghcr.digest, ghcr.fetched, ghcr.checked) == (DIGEST_A, T0 + 9, T0 + 9)


async def test_touch_and_flush_are_per_registry(
    store: MetadataStore, db_path: Path
) -> None:
    for registry in (HUB, GHCR):
        await store.put_tag(registry, "team/app", "1", DIGEST_A, MEDIA, 1, T0)
    store.touch_tag(GHCR, "team/app", "1", T0 + 50)
    await store.flush_access()
    assert rows(db_path, "SELECT registry, last_access FROM tags") == {
        (HUB, T0),
        (GHCR, T0 + 50),
    }
    store.touch_tag(HUB, "team/app", "1", T0 + 60)
    store.touch_tag("quay.io", "team/app", "1", T0 + 70)  # not cached: ignored
    await store.flush_access()
    assert rows(db_path, "SELECT registry, last_access FROM tags") == {
        (HUB, T0 + 60),
        (GHCR, T0 + 50),
    }


async def test_manifest_links_are_per_registry(
    store: MetadataStore, db_path: Path
) -> None:
    await store.put_manifest(HUB, "team/app", DIGEST_A, MEDIA, BODY, T0)
    await store.put_manifest(GHCR, "team/app", DIGEST_A, MEDIA, BODY, T0 + 1)
    await store.put_manifest(GHCR, "team/app", DIGEST_A, MEDIA, BODY, T0 + 2)
    assert rows(db_path, "SELECT * FROM repository_manifests") == {
        (HUB, "team/app", DIGEST_A),
        (GHCR, "team/app", DIGEST_A),
    }
    assert scalar(db_path, "SELECT count(*) FROM manifests") == 1  # shared


async def test_purge_takes_only_its_registry_s_tags_and_links(
    store: MetadataStore,
) -> None:
    for registry in (HUB, GHCR):
        await store.put_manifest(registry, "team/app", DIGEST_A, MEDIA, BODY, T0)
        await store.put_tag(registry, "team/app", "1", DIGEST_A, MEDIA, 1, T0)
        await store.put_tag(registry, "team/app", "2", DIGEST_A, MEDIA, 1, T0)

    record = await store.purge_repository(GHCR, "team/app", "1")
    assert record.tags == [(GHCR, "team/app", "1", DIGEST_A)]
    assert record.links == []  # ghcr.io's tag 2 still reaches it
    assert await store.get_tag(HUB, "team/app", "1") is not None

    record = await store.purge_repository(GHCR, "team/app")
    assert record.tags == [(GHCR, "team/app", "2", DIGEST_A)]
    assert record.links == [(GHCR, "team/app", DIGEST_A)]
    assert record.manifests == []  # docker.io's tags keep the shared manifest
    assert await store.get_manifest(DIGEST_A) is not None
    assert [t.tag for t in await store.repository_tags(HUB, "team/app")] == ["1", "2"]
    assert await store.repository_tags(GHCR, "team/app") == []

    record = await store.purge_repository(HUB, "team/app")
    assert [d for d, _t, _n in record.manifests] == [DIGEST_A]
    assert await store.get_manifest(DIGEST_A) is None


async def test_referrers_are_kept_per_registry_repository_subject_and_filter(
    store: MetadataStore,
) -> None:
    listed = ReferrersRecord(200, OCI_INDEX, b'{"manifests":[]}', None, T0)
    filtered = ReferrersRecord(200, OCI_INDEX, b"{}", "artifactType", T0 + 1)
    missing = ReferrersRecord(404, "", b"", None, T0 + 2)
    await store.put_referrers(GHCR, "owner/app", DIGEST_A, "", listed)
    await store.put_referrers(GHCR, "owner/app", DIGEST_A, "x/sig", filtered)
    await store.put_referrers(HUB, "owner/app", DIGEST_A, "", missing)
    assert await store.get_referrers(GHCR, "owner/app", DIGEST_A, "") == listed
    assert await store.get_referrers(GHCR, "owner/app", DIGEST_A, "x/sig") == filtered
    assert await store.get_referrers(HUB, "owner/app", DIGEST_A, "") == missing
    assert await store.get_referrers(GHCR, "other/app", DIGEST_A, "") is None
    newer = ReferrersRecord(200, OCI_INDEX, b"{}", None, T0 + 60)
    await store.put_referrers(GHCR, "owner/app", DIGEST_A, "", newer)
    assert await store.get_referrers(GHCR, "owner/app", DIGEST_A, "") == newer


async def test_purges_drop_referrers_lists(store: MetadataStore) -> None:
    old = ReferrersRecord(200, OCI_INDEX, b"{}", None, T0)
    new = ReferrersRecord(200, OCI_INDEX, b"{}", None, T0 + 100)
    await store.put_referrers(GHCR, "owner/app", DIGEST_A, "", old)
    await store.put_referrers(HUB, "owner/app", DIGEST_A, "", new)
    await store.purge_repository(GHCR, "owner/app", dry_run=True)
    assert await store.get_referrers(GHCR, "owner/app", DIGEST_A, "") == old
    await store.purge_repository(GHCR, "owner/app")
    assert await store.get_referrers(GHCR, "owner/app", DIGEST_A, "") is None
    assert await store.get_referrers(HUB, "owner/app", DIGEST_A, "") == new
    await store.purge_older_than(T0 + 50)
    assert await store.get_referrers(HUB, "owner/app", DIGEST_A, "") == new
    await store.purge_older_than(T0 + 150)
    assert await store.get_referrers(HUB, "owner/app", DIGEST_A, "") is None


async def test_tag_is_committed(store: MetadataStore, db_path: Path) -> None:
    await store.put_tag(HUB, "library/alpine", "latest", DIGEST_A, MEDIA, 1, T0)
    assert scalar(db_path, "SELECT digest FROM tags WHERE tag = 'latest'") == DIGEST_A


# --- blobs and access times -------------------------------------------------------


async def test_add_blob(store: MetadataStore, db_path: Path) -> None:
    await store.add_blob(DIGEST_A, 4096, T0)
    with reader(db_path) as conn:
        row = conn.execute(
            "SELECT size, created, last_access FROM blobs WHERE digest = ?",
            (DIGEST_A,),
        ).fetchone()
    assert row == (4096, T0, T0)


async def test_add_blob_again_keeps_created(
    store: MetadataStore, db_path: Path
) -> None:
    await store.add_blob(DIGEST_A, 4096, T0)
    await store.add_blob(DIGEST_A, 4096, T0 + 30)
    with reader(db_path) as conn:
        rows = conn.execute("SELECT digest, created, last_access FROM blobs").fetchall()
    assert rows == [(DIGEST_A, T0, T0 + 30)]


def _last_access(db_path: Path, table: str, digest: str) -> object:
    assert table in {"blobs", "manifests"}
    return scalar(
        db_path,
        f"SELECT last_access FROM {table} WHERE digest = ?",  # noqa: S608 - fixed names
        digest,
    )


async def test_touches_wait_for_flush(store: MetadataStore, db_path: Path) -> None:
    await store.add_blob(DIGEST_A, 10, T0)
    await store.add_blob(DIGEST_B, 20, T0)
    await store.put_manifest(HUB, "library/alpine", DIGEST_A, MEDIA, BODY, T0)

    store.touch_blob(DIGEST_A, T0 + 100)
    store.touch_blob(DIGEST_B, T0 + 200)
    store.touch_manifest(DIGEST_A, T0 + 300)
    # Nothing written yet: a cache hit costs no write.
    assert _last_access(db_path, "blobs", DIGEST_A) == T0
    assert _last_access(db_path, "blobs", DIGEST_B) == T0
    assert _last_access(db_path, "manifests", DIGEST_A) == T0

    await store.flush_access()
    assert _last_access(db_path, "blobs", DIGEST_A) == T0 + 100
    assert _last_access(db_path, "blobs", DIGEST_B) == T0 + 200
    assert _last_access(db_path, "manifests", DIGEST_A) == T0 + 300


async def test_flush_is_one_transaction(store: MetadataStore, db_path: Path) -> None:
    await store.add_blob(DIGEST_A, 10, T0)
    await store.add_blob(DIGEST_B, 10, T0)
    await store.put_manifest(HUB, "library/alpine", DIGEST_A, MEDIA, BODY, T0)
    store.touch_blob(DIGEST_A, T0 + 1)
    store.touch_blob(DIGEST_B, T0 + 2)
    store.touch_manifest(DIGEST_A, T0 + 3)

    traced: list[str] = []
    await store.db.set_trace_callback(traced.append)
    await store.flush_access()
    statements = list(traced)  # ignore what close() runs later

    verbs = [s.split()[0].upper() for s in statements]
    assert verbs.count("COMMIT") == 1
    assert verbs.count("BEGIN") == 1
    assert verbs.index("BEGIN") < verbs.index("UPDATE")
    assert verbs[-1] == "COMMIT"
    assert verbs.count("UPDATE") == 3
    assert _last_access(db_path, "blobs", DIGEST_A) == T0 + 1
    assert _last_access(db_path, "blobs", DIGEST_B) == T0 + 2
    assert _last_access(db_path, "manifests", DIGEST_A) == T0 + 3


async def test_flush_with_nothing_pending_writes_nothing(
    store: MetadataStore, db_path: Path
) -> None:
    await store.add_blob(DIGEST_A, 10, T0)
    with reader(db_path) as conn:
        before = conn.execute("PRAGMA data_version").fetchone()[0]
        await store.flush_access()
        after = conn.execute("PRAGMA data_version").fetchone()[0]
    assert after == before


async def test_flush_clears_pending(store: MetadataStore, db_path: Path) -> None:
    await store.add_blob(DIGEST_A, 10, T0)
    store.touch_blob(DIGEST_A, T0 + 5)
    await store.flush_access()
    with reader(db_path) as conn:
        before = conn.execute("PRAGMA data_version").fetchone()[0]
        await store.flush_access()
        after = conn.execute("PRAGMA data_version").fetchone()[0]
    assert after == before


async def test_flush_never_moves_access_backwards(
    store: MetadataStore, db_path: Path
) -> None:
    await store.add_blob(DIGEST_A, 10, T0 + 50)
    store.touch_blob(DIGEST_A, T0)
    await store.flush_access()
    assert _last_access(db_path, "blobs", DIGEST_A) == T0 + 50


async def test_latest_touch_wins(store: MetadataStore, db_path: Path) -> None:
    await store.add_blob(DIGEST_A, 10, T0)
    store.touch_blob(DIGEST_A, T0 + 1)
    store.touch_blob(DIGEST_A, T0 + 9)
    await store.flush_access()
    assert _last_access(db_path, "blobs", DIGEST_A) == T0 + 9


async def test_touch_of_unknown_digest_is_ignored(
    store: MetadataStore, db_path: Path
) -> None:
    store.touch_blob(DIGEST_B, T0)
    store.touch_manifest(DIGEST_B, T0)
    await store.flush_access()
    assert scalar(db_path, "SELECT count(*) FROM blobs") == 0
    assert scalar(db_path, "SELECT count(*) FROM manifests") == 0


async def test_close_flushes_pending_access(db_path: Path) -> None:
    meta = MetadataStore(db_path)
    await meta.open()
    await meta.add_blob(DIGEST_A, 10, T0)
    meta.touch_blob(DIGEST_A, T0 + 42)
    await meta.close()
    assert _last_access(db_path, "blobs", DIGEST_A) == T0 + 42


async def test_deleting_a_blob_keeps_the_other_blobs_pending_access_times(
    store: MetadataStore,
) -> None:
    for n, digest in enumerate(("sha256:a", "sha256:b", "sha256:c"), start=1):
        await store.add_blob(digest, 10, float(n))
    store.touch_blob("sha256:a", 20.0)
    store.touch_blob("sha256:b", 10.0)  # b is now the more recently used
    await store.delete_blobs(["sha256:a"])
    # a's pending access is dropped with it, b's is kept.
    assert await store.least_recently_used(3) == [("sha256:c", 10), ("sha256:b", 10)]
