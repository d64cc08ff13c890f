"""Unit tests for mirror.cache.metadata against a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from mirror.cache.metadata import (
    SCHEMA_VERSION,
    ManifestRecord,
    MetadataStore,
    TagRecord,
)

T0 = 1_700_000_000.0
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
MEDIA = "application/vnd.oci.image.manifest.v1+json"
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
    await first.put_manifest("library/alpine", DIGEST_A, MEDIA, BODY, T0)
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
        with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1}"):
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


# --- manifests --------------------------------------------------------------------


async def test_manifest_round_trip_is_byte_exact(store: MetadataStore) -> None:
    await store.put_manifest("library/alpine", DIGEST_A, MEDIA, BODY, T0)
    record = await store.get_manifest(DIGEST_A)
    assert record is not None
    assert record.body == BODY
    assert type(record.body) is bytes
    assert record.media_type == MEDIA
    assert record.digest == DIGEST_A


async def test_missing_manifest_is_none(store: MetadataStore) -> None:
    assert await store.get_manifest(DIGEST_B) is None


async def test_manifest_rows(store: MetadataStore, db_path: Path) -> None:
    await store.put_manifest("library/alpine", DIGEST_A, MEDIA, BODY, T0)
    await store.put_manifest("mirror/alpine", DIGEST_A, MEDIA, BODY, T0 + 5)
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
    assert await store.get_tag("library/alpine", "latest") is None


async def test_put_and_get_tag(store: MetadataStore) -> None:
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    assert await store.get_tag("library/alpine", "latest") == TagRecord(
        "library/alpine", "latest", DIGEST_A, MEDIA, 123, T0, T0
    )
    assert await store.get_tag("library/alpine", "3.19") is None
    assert await store.get_tag("library/busybox", "latest") is None


async def test_same_digest_keeps_fetched_and_updates_checked(
    store: MetadataStore,
) -> None:
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 123, T0 + 60)
    tag = await store.get_tag("library/alpine", "latest")
    assert tag is not None
    assert tag.fetched == T0
    assert tag.checked == T0 + 60


async def test_moved_tag_resets_fetched(store: MetadataStore) -> None:
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 123, T0)
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 123, T0 + 10)
    other = "application/vnd.docker.distribution.manifest.v2+json"
    await store.put_tag("library/alpine", "latest", DIGEST_B, other, 456, T0 + 60)
    assert await store.get_tag("library/alpine", "latest") == TagRecord(
        "library/alpine", "latest", DIGEST_B, other, 456, T0 + 60, T0 + 60
    )


async def test_tags_are_per_repository(store: MetadataStore) -> None:
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 1, T0)
    await store.put_tag("library/busybox", "latest", DIGEST_B, MEDIA, 2, T0 + 1)
    alpine = await store.get_tag("library/alpine", "latest")
    busybox = await store.get_tag("library/busybox", "latest")
    assert alpine is not None
    assert busybox is not None
    assert (alpine.digest, busybox.digest) == (DIGEST_A, DIGEST_B)


async def test_tag_is_committed(store: MetadataStore, db_path: Path) -> None:
    await store.put_tag("library/alpine", "latest", DIGEST_A, MEDIA, 1, T0)
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
    await store.put_manifest("library/alpine", DIGEST_A, MEDIA, BODY, T0)

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
    await store.put_manifest("library/alpine", DIGEST_A, MEDIA, BODY, T0)
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
