"""Unit tests for mirror.cache.blobs: layout, temp files and atomic commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.cache.blobs import BlobStore
from mirror.reference import Digest

DATA = b"layer bytes " * 100
DIGEST = Digest.of(DATA)


@pytest.fixture
async def store(tmp_path: Path) -> BlobStore:
    blobs = BlobStore(tmp_path / "cache")
    await blobs.open()
    return blobs


def test_constructor_does_no_io(tmp_path: Path) -> None:
    BlobStore(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


async def test_open_creates_directories(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "cache"
    await BlobStore(root).open()
    assert (root / "blobs").is_dir()
    assert (root / "tmp").is_dir()


async def test_open_removes_leftover_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = BlobStore(root)
    await first.open()
    leftover = first.temp_path()
    leftover.write_bytes(b"half a download")
    (root / "tmp" / "subdir").mkdir()
    committed = await _commit(first, DATA)

    await BlobStore(root).open()
    assert list((root / "tmp").iterdir()) == []
    assert committed.read_bytes() == DATA  # blobs survive a restart


async def test_open_is_idempotent(store: BlobStore) -> None:
    await store.open()
    assert store.blob_dir.is_dir()


def test_path_layout(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = Digest("sha256", "ab" + "c" * 62)
    assert blobs.path(digest) == tmp_path / "blobs" / "sha256" / "ab" / digest.hex
    sha512 = Digest("sha512", "0f" * 64)
    assert blobs.path(sha512) == tmp_path / "blobs" / "sha512" / "0f" / sha512.hex


def test_temp_paths_are_unique_and_under_tmp(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    paths = {blobs.temp_path() for _ in range(50)}
    assert len(paths) == 50
    assert all(p.parent == tmp_path / "tmp" for p in paths)


async def _commit(blobs: BlobStore, data: bytes) -> Path:
    temp = blobs.temp_path()
    temp.write_bytes(data)
    return await blobs.commit(temp, Digest.of(data))


async def test_commit_moves_temp_into_place(store: BlobStore) -> None:
    temp = store.temp_path()
    temp.write_bytes(DATA)
    final = store.path(DIGEST)
    assert not final.exists()
    assert await store.size(DIGEST) is None

    result = await store.commit(temp, DIGEST)

    assert result == final
    assert final.read_bytes() == DATA
    assert not temp.exists()
    assert await store.size(DIGEST) == len(DATA)


async def test_commit_is_a_rename_keeping_open_fds_valid(store: BlobStore) -> None:
    temp = store.temp_path()
    temp.write_bytes(DATA)
    inode = temp.stat().st_ino
    with temp.open("rb") as reader:
        head = reader.read(10)
        final = await store.commit(temp, DIGEST)
        rest = reader.read()
    assert head + rest == DATA
    assert final.stat().st_ino == inode  # the same file, not a copy


async def test_commit_replaces_an_existing_blob(store: BlobStore) -> None:
    first = await _commit(store, DATA)
    again = await _commit(store, DATA)
    assert first == again
    assert again.read_bytes() == DATA
    assert [p.name for p in first.parent.iterdir()] == [DIGEST.hex]


async def test_size_is_none_when_missing(store: BlobStore) -> None:
    assert await store.size(Digest.of(b"never stored")) is None


async def test_size_of_empty_blob(store: BlobStore) -> None:
    await _commit(store, b"")
    assert await store.size(Digest.of(b"")) == 0


async def test_discard_is_idempotent(store: BlobStore) -> None:
    temp = store.temp_path()
    temp.write_bytes(b"partial")
    await store.discard(temp)
    assert not temp.exists()
    await store.discard(temp)  # already gone: no error


async def test_delete_is_idempotent(store: BlobStore) -> None:
    final = await _commit(store, DATA)
    await store.delete(DIGEST)
    assert not final.exists()
    assert await store.size(DIGEST) is None
    await store.delete(DIGEST)  # already gone: no error


async def test_delete_leaves_other_blobs(store: BlobStore) -> None:
    kept = await _commit(store, b"other")
    await _commit(store, DATA)
    await store.delete(DIGEST)
    assert kept.read_bytes() == b"other"


async def test_commit_writes_nothing_under_blobs_before_rename(
    store: BlobStore,
) -> None:
    temp = store.temp_path()
    with temp.open("wb") as fh:
        fh.write(DATA[:10])
        fh.flush()
        os.fsync(fh.fileno())
        # Mid-download: nothing for this digest is visible under blobs/.
        assert not store.path(DIGEST).exists()
        assert await store.size(DIGEST) is None
        fh.write(DATA[10:])
    await store.commit(temp, DIGEST)
    assert store.path(DIGEST).read_bytes() == DATA
