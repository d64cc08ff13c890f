"""The pull path over real HTTP: mirror app in front of a FakeRegistry."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from mirror.cache.blobs import BlobStore
from mirror.cache.metadata import DATABASE_NAME, MetadataStore
from tests.conftest import MirrorFactory
from tests.fakes.registry import CHUNK, OCI_MANIFEST, FakeRegistry, sha256
from tests.functional.conftest import prefix_on_disk, record_sendfile
from tests.promtext import parse_samples


def layer(n: int, size: int = 300_000) -> bytes:
    """Deterministic, incompressible-enough bytes for blob `n`."""
    return hashlib.sha256(str(n).encode()).digest() * (size // 32)


async def test_base_endpoint_announces_api_version(make_mirror: MirrorFactory) -> None:
    mirror = await make_mirror()
    resp = await mirror.client.get("/v2/")
    assert resp.status == 200
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_bytes_and_headers_are_upstream_verbatim(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/alpine", "3", [layer(1)])
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get("/v2/alpine/manifests/3")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Content-Length"] == str(len(image.manifest))

    head = await mirror.client.head(f"/v2/library/alpine/manifests/{image.digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert await head.read() == b""


async def test_blob_miss_then_hit_costs_one_upstream_get(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = layer(2, 1_000_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    for expected_cache in ("miss", "hit"):
        resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 200
        assert resp.headers["X-Mirror-Cache"] == expected_cache
        assert await resp.read() == data
        await mirror.settle()
        assert resp.headers["Docker-Content-Digest"] == digest
    assert upstream.count("blob", "GET") == 1


async def test_concurrent_cold_pulls_share_one_upstream_get(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = layer(3, 2_000_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    async def pull() -> bytes:
        resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    tasks = [asyncio.create_task(pull()) for _ in range(20)]
    await asyncio.sleep(0.2)
    upstream.gate.set()
    bodies = await asyncio.gather(*tasks)
    assert all(sha256(b) == digest for b in bodies)
    assert upstream.count("blob", "GET") == 1


async def test_corrupt_blob_is_never_cached_nor_completed(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = layer(4, 500_000)
    digest = upstream.add_blob(data)
    upstream.corrupt.add(digest)
    upstream.gate = asyncio.Event()  # the client is sent bytes before the end
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    await resp.content.readany()
    upstream.gate.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))

    upstream.corrupt.clear()
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data
    assert upstream.count("blob", "GET") == 2


async def test_write_methods_are_unsupported(make_mirror: MirrorFactory) -> None:
    mirror = await make_mirror()
    for method, path in [
        ("PUT", "/v2/library/x/manifests/1"),
        ("POST", "/v2/library/x/blobs/uploads/"),
        ("DELETE", "/v2/library/x/blobs/sha256:" + "0" * 64),
        ("PATCH", "/v2/library/x/blobs/uploads/abc"),
    ]:
        resp = await mirror.client.request(method, path)
        assert resp.status == 405, (method, path)
        body = json.loads(await resp.read())
        assert body["errors"][0]["code"] == "UNSUPPORTED"


async def test_truncated_upstream_body_aborts_clients_and_caches_nothing(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = layer(5, 1_000_000)
    digest = upstream.add_blob(data)
    upstream.truncate[digest] = 300_000
    upstream.gate = asyncio.Event()  # hold the body after its first chunk
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    await resp.content.readany()
    upstream.gate.set()
    # Cut short: the connection is aborted. A response ended cleanly short
    # of its Content-Length would leave the client waiting for the rest.
    async with asyncio.timeout(10):
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await mirror.settle()  # the failed download has cleaned up after itself
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))
    assert not any(mirror.config.cache.dir.glob("tmp/*"))

    del upstream.truncate[digest]
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data


async def test_client_leaving_does_not_stop_the_download(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = layer(6, 2_000_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    await resp.content.readany()
    resp.close()  # the only client hangs up mid-blob
    upstream.gate.set()
    cached = mirror.config.cache.dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    for _ in range(200):
        if cached.exists():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the abandoned download never reached the store")
    assert cached.read_bytes() == data
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data
    assert upstream.count("blob", "GET") == 1


async def test_late_joiner_gets_the_whole_blob_from_the_start(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = layer(7, 1_500_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    first = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    head_of_first = await first.content.readany()  # upstream sent a first chunk
    late = await mirror.client.get(f"/v2/library/y/blobs/{digest}")
    upstream.gate.set()
    assert head_of_first + await first.read() == data
    assert await late.read() == data
    assert upstream.count("blob", "GET") == 1


async def test_joiner_gets_what_is_on_disk_by_sendfile_then_the_rest_live(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = layer(12, 3_000_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)
    calls = record_sendfile(monkeypatch)

    first = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    head_of_first = await first.content.readany()
    # upstream's first chunk
    await prefix_on_disk(mirror.client.app, mirror.config.cache.dir, CHUNK)
    late = await mirror.client.get(f"/v2/library/y/blobs/{digest}")
    ranged = await mirror.client.get(
        f"/v2/library/y/blobs/{digest}", headers={"Range": "bytes=1000-"}
    )
    late_head = await late.content.readexactly(CHUNK)
    upstream.gate.set()
    rest_of_first, rest_of_late, whole_range = await asyncio.gather(
        first.read(), late.read(), ranged.read()
    )
    assert head_of_first + rest_of_first == data
    assert late_head + rest_of_late == data
    assert whole_range == data[1000:]
    # The joiners' prefixes went by sendfile from the temp file (the only
    # bytes on disk before the gate opened: later spans, for a reader that
    # fell behind the writer, come after); the first client's all through
    # memory.
    assert sorted(calls[:2]) == [(0, CHUNK), (1000, CHUNK - 1000)]
    assert upstream.count("blob", "GET") == 1


async def test_where_sendfile_fails_a_joiner_gets_its_bytes_by_pread(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sendfile refused (EINVAL: a file system without it). asyncio's own
    # fallback would read the download's shared file at its position, which
    # every joiner moves; the bytes must come from the right offsets anyway.
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = os.urandom(3_000_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    def refuse(*args: object) -> int:
        raise OSError(errno.EINVAL, "sendfile is not supported here")

    monkeypatch.setattr(os, "sendfile", refuse)
    first = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    head_of_first = await first.content.readany()
    await prefix_on_disk(mirror.client.app, mirror.config.cache.dir, CHUNK)
    ranged = await mirror.client.get(
        f"/v2/library/y/blobs/{digest}", headers={"Range": "bytes=1000-"}
    )
    ranged_head = await ranged.content.readexactly(CHUNK - 1000)
    late = await mirror.client.get(f"/v2/library/y/blobs/{digest}")
    upstream.gate.set()
    async with asyncio.timeout(10):
        rest_of_first, rest_of_range, whole = await asyncio.gather(
            first.read(), ranged.read(), late.read()
        )
    assert head_of_first + rest_of_first == data
    assert ranged_head + rest_of_range == data[1000:]
    assert whole == data
    assert upstream.count("blob", "GET") == 1


async def test_range_requests_on_cached_and_downloading_blobs(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = layer(8, 400_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)
    path = f"/v2/library/x/blobs/{digest}"

    resp = await mirror.client.get(path, headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert await resp.read() == data[100:200]

    resp = await mirror.client.get(path, headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert await resp.read() == data[1000:]
    resp = await mirror.client.get(path, headers={"Range": "bytes=-10"})
    assert await resp.read() == data[-10:]
    resp = await mirror.client.get(path, headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416


async def test_range_beyond_an_uncached_blob_is_416(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    data = layer(9, 1000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(
        f"/v2/library/x/blobs/{digest}", headers={"Range": "bytes=5000-"}
    )
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    assert json.loads(await resp.read())["errors"][0]["code"] == "RANGE_INVALID"


async def test_head_blob_answers_size_without_downloading(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = layer(10, 12345)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.head(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Docker-Content-Digest"] == digest
    assert upstream.count("blob", "GET") == 0
    missing = "sha256:" + "1" * 64
    resp = await mirror.client.head(f"/v2/library/x/blobs/{missing}")
    assert resp.status == 404


async def test_head_of_a_cached_or_downloading_blob_asks_upstream_nothing(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    cached, downloading = layer(11, 20000), layer(12, 300_000)
    cached_digest = upstream.add_blob(cached)
    downloading_digest = upstream.add_blob(downloading)
    mirror = await make_mirror(upstream)
    assert await (
        await mirror.client.get(f"/v2/library/x/blobs/{cached_digest}")
    ).read()
    await mirror.settle()
    upstream.gate = asyncio.Event()  # the next download holds after a chunk
    pulling = await mirror.client.get(f"/v2/library/x/blobs/{downloading_digest}")
    before = len(upstream.log)
    for digest, data in ((cached_digest, cached), (downloading_digest, downloading)):
        resp = await mirror.client.head(f"/v2/library/x/blobs/{digest}")
        assert (resp.status, resp.headers["Content-Length"]) == (200, str(len(data)))
    assert upstream.log[before:] == []
    upstream.gate.set()
    assert await pulling.read() == downloading


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "BLOB_UNKNOWN"), (503, "UNAVAILABLE"), (500, "UNAVAILABLE")],
)
async def test_upstream_errors_become_oci_errors(
    make_mirror: MirrorFactory, status: int, code: str
) -> None:
    upstream = FakeRegistry()
    upstream.fail_statuses = [status] * 3  # every attempt the mirror makes
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/blobs/sha256:{'2' * 64}")
    assert resp.status == (404 if status == 404 else 503)
    assert json.loads(await resp.read())["errors"][0]["code"] == code
    # 5xx is retried (3 attempts by default), 404 is not.
    assert upstream.count("blob") == (1 if status == 404 else 3)


async def test_twenty_concurrent_image_pulls_cost_one_get_per_blob(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    image = upstream.push_image(
        "someuser/app", "v1", [layer(20 + i, 700_000) for i in range(4)]
    )
    mirror = await make_mirror(upstream)

    async def pull() -> dict[str, str]:
        resp = await mirror.client.get("/v2/someuser/app/manifests/v1")
        manifest = json.loads(await resp.read())
        digests = [manifest["config"]["digest"]] + [
            layer["digest"] for layer in manifest["layers"]
        ]

        async def fetch(digest: str) -> str:
            resp = await mirror.client.get(f"/v2/someuser/app/blobs/{digest}")
            assert resp.status == 200
            return sha256(await resp.read())

        got = await asyncio.gather(*(fetch(d) for d in digests))
        return dict(zip(digests, got, strict=True))

    pulls = [asyncio.create_task(pull()) for _ in range(20)]
    await asyncio.sleep(0.2)  # let every client attach before bytes flow
    upstream.gate.set()
    for result in await asyncio.gather(*pulls):
        assert result == {d: d for d in image.blobs}
    assert upstream.count("manifest", "GET") == 1
    for digest in image.blobs:
        gets = [r for r in upstream.requests("blob", "GET") if r.path.endswith(digest)]
        assert len(gets) == 1, digest


async def test_every_client_attached_to_a_corrupt_download_is_cut_short(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = layer(30, 800_000)
    digest = upstream.add_blob(data)
    upstream.corrupt.add(digest)
    mirror = await make_mirror(upstream)

    async def pull() -> str:
        resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
        if resp.status != 200:  # arrived after the failure: an error, fine too
            return str(resp.status)
        try:
            await resp.read()
        except aiohttp.ClientPayloadError:
            return "cut short"
        return "complete"

    pulls = [asyncio.create_task(pull()) for _ in range(5)]
    await asyncio.sleep(0.1)  # attach before the bytes flow
    upstream.gate.set()
    results = await asyncio.gather(*pulls)
    assert "complete" not in results
    assert "cut short" in results
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))


@pytest.mark.parametrize("served", [b"", b"x", b"short body"])
async def test_wrong_small_body_is_an_error_not_a_complete_response(
    make_mirror: MirrorFactory, served: bytes
) -> None:
    upstream = FakeRegistry()
    digest = upstream.add_blob(layer(31, 5000))
    upstream.replace[digest] = served
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 503
    assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))


async def test_a_full_disk_streams_the_blob_uncached_to_the_client(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    data = layer(60, 2_000_000)
    digest = upstream.add_blob(data)
    upstream.gate = asyncio.Event()  # hold the body after its first chunk
    mirror = await make_mirror(upstream)

    def disk_full(fd: int, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("mirror.download._write_all", disk_full)
    url = f"/v2/library/x/blobs/{digest}"
    resp = await mirror.client.get(url)
    upstream.gate.set()
    assert await resp.read() == data  # whole and verified, though not stored
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))
    assert not any(mirror.config.cache.dir.glob("tmp/*"))
    samples = parse_samples(await (await mirror.client.get("/metrics")).text())
    assert samples['mirror_uncached_downloads_total{reason="disk_full"}'] == 1
    monkeypatch.undo()  # space again: the next pull caches it
    assert await (await mirror.client.get(url)).read() == data
    await mirror.settle()
    assert upstream.count("blob", "GET") == 2
    assert (await mirror.client.get(url)).headers["X-Mirror-Cache"] == "hit"


async def test_shutdown_waits_for_a_verified_download_to_commit(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    data = layer(61, 500_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)
    commit = BlobStore._commit

    def slow_commit(temp: Path, final: Path) -> None:
        time.sleep(0.5)  # a slow fsync: the client has every byte by now
        commit(temp, final)

    monkeypatch.setattr(BlobStore, "_commit", staticmethod(slow_commit))
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data
    await mirror.client.close()  # SIGTERM: the app shuts down now

    cache_dir = mirror.config.cache.dir
    path = cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert path.read_bytes() == data
    metadata = MetadataStore(cache_dir / DATABASE_NAME)
    await metadata.open()
    try:
        assert await metadata.all_blobs() == {digest: len(data)}
    finally:
        await metadata.close()


async def test_a_full_database_costs_the_cache_entry_not_the_client(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    data = layer(62, 400_000)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream)

    async def database_full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MetadataStore, "add_blob", database_full)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data
    await mirror.settle()
    # No file without its row: the blob is not left in the store.
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))
    samples = parse_samples(await (await mirror.client.get("/metrics")).text())
    assert samples['mirror_uncached_downloads_total{reason="disk_full"}'] == 1
    assert samples.get('mirror_uncached_downloads_total{reason="store_error"}', 0) == 0
