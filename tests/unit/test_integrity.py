"""reconcile(): each way files and rows can disagree after a crash, and what
start-up makes of it. verify(): bit rot found by re-hashing."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirror.cache.blobs import BlobStore
from mirror.cache.integrity import reconcile, verify
from mirror.cache.metadata import DATABASE_NAME, MetadataStore
from mirror.reference import Digest

NOW = 1_700_000_000.0


@dataclass
class Store:
    metadata: MetadataStore
    blobs: BlobStore

    def plant(self, data: bytes, *, name_of: bytes | None = None) -> Digest:
        """A file in the store, named by the digest of `name_of` (default:
        its own bytes), with no row."""
        digest = Digest("sha256", hashlib.sha256(name_of or data).hexdigest())
        path = self.blobs.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    async def rows(self) -> dict[str, int]:
        return await self.metadata.all_blobs()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    metadata = MetadataStore(tmp_path / DATABASE_NAME)
    blobs = BlobStore(tmp_path)
    await metadata.open()
    await blobs.open()
    try:
        yield Store(metadata, blobs)
    finally:
        await metadata.close()


async def test_agreeing_files_and_rows_are_left_alone_without_hashing(
    store: Store,
) -> None:
    digest = store.plant(b"good" * 100)
    await store.metadata.add_blob(str(digest), 400, NOW)
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert (report.checked, report.rows_dropped, report.adopted) == (0, 0, 0)
    assert report.removed == []
    assert await store.rows() == {str(digest): 400}
    assert store.blobs.path(digest).read_bytes() == b"good" * 100


async def test_a_row_whose_file_is_gone_is_dropped(store: Store) -> None:
    kept = store.plant(b"kept")
    await store.metadata.add_blob(str(kept), 4, NOW)
    gone = Digest("sha256", hashlib.sha256(b"gone").hexdigest())
    await store.metadata.add_blob(str(gone), 4, NOW)
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert report.rows_dropped == 1
    assert await store.rows() == {str(kept): 4}


async def test_a_right_file_without_a_row_is_adopted(store: Store) -> None:
    orphan = store.plant(b"orphan" * 10)
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert (report.checked, report.adopted) == (1, 1)
    assert await store.rows() == {str(orphan): 60}
    assert store.blobs.path(orphan).read_bytes() == b"orphan" * 10


async def test_a_wrong_file_without_a_row_is_removed(store: Store) -> None:
    corrupt = store.plant(b"flipped bits", name_of=b"the real content")
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert report.removed == [str(corrupt)]
    assert report.adopted == 0
    assert not store.blobs.path(corrupt).exists()
    assert await store.rows() == {}


async def test_a_file_whose_size_disagrees_with_its_row_is_hashed(
    store: Store,
) -> None:
    # Right bytes, stale row (a crash between rename and the row's update):
    # adopted with its real size.
    right = store.plant(b"right" * 20)
    await store.metadata.add_blob(str(right), 7, NOW)
    # Wrong bytes under a row of the right size for the real content.
    wrong = store.plant(b"short", name_of=b"the real, longer content")
    await store.metadata.add_blob(str(wrong), len(b"the real, longer content"), NOW)
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert report.checked == 2
    assert report.adopted == 1
    assert report.removed == [str(wrong)]
    assert await store.rows() == {str(right): 100}
    assert not store.blobs.path(wrong).exists()


async def test_a_file_that_is_not_named_by_a_digest_is_left_alone(
    store: Store,
) -> None:
    stray = store.blobs.blob_dir / "sha256" / "ab" / "notes.txt"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("an operator's notes")
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert report.checked == 0
    assert stray.read_text() == "an operator's notes"
    assert await store.rows() == {}


async def test_verify_finds_bit_rot_that_reconcile_cannot_see(store: Store) -> None:
    digest = store.plant(b"x" * 1000)
    await store.metadata.add_blob(str(digest), 1000, NOW)
    path = store.blobs.path(digest)
    path.write_bytes(b"y" + b"x" * 999)  # same size: the row agrees
    assert (await reconcile(store.metadata, store.blobs, NOW)).removed == []
    calls: list[tuple[int, int, int, int]] = []
    report = await verify(store.metadata, store.blobs, lambda *args: calls.append(args))
    assert (report.checked, report.removed) == (1, [str(digest)])
    assert not path.exists()
    assert await store.rows() == {}
    assert calls == [(1, 1, 1000, 1000)]


async def test_adopted_files_are_counted_and_dated_now(store: Store) -> None:
    first = store.plant(b"first orphan")
    second = store.plant(b"second orphan")
    report = await reconcile(store.metadata, store.blobs, NOW)
    assert (report.checked, report.adopted) == (2, 2)
    async with store.metadata.db.execute(
        "SELECT digest, created, last_access FROM blobs ORDER BY digest"
    ) as cursor:
        rows = sorted(await cursor.fetchall())
    assert rows == sorted([(str(first), NOW, NOW), (str(second), NOW, NOW)])


async def test_verify_counts_every_file_it_hashes(store: Store) -> None:
    for n in range(3):
        digest = store.plant(b"blob %d" % n)
        await store.metadata.add_blob(str(digest), len(b"blob 0"), NOW)
    report = await verify(store.metadata, store.blobs)
    assert (report.checked, report.removed) == (3, [])
