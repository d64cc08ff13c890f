"""The size budget through the real HTTP path, with real files."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import threading

import aiohttp
import pytest
from aiohttp import web

from mirror import download
from mirror.app import CACHE, EVICTOR
from mirror.download import MIN_WINDOW, READ_CHUNK, WINDOW
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry, sha256

KiB = 1024


def blob(n: int, size: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (size // 32)


def store_bytes(mirror: Mirror) -> int:
    return sum(p.stat().st_size for p in mirror.config.cache.dir.glob("blobs/*/*/*"))


async def get(mirror: Mirror, digest: str) -> bytes:
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    data = await resp.read()
    await mirror.settle()  # in the store now, as eviction sees it
    return data


async def metric(mirror: Mirror, name: str) -> float:
    text = await (await mirror.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


async def test_pulling_past_the_budget_evicts_least_recently_used(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    digests = [upstream.add_blob(blob(i, 200 * KiB)) for i in range(8)]
    mirror = await make_mirror(
        upstream, cache_max_size="1MiB", cache_low_watermark="80%"
    )
    evictor = mirror.client.app[EVICTOR]
    for i, digest in enumerate(digests):  # 1.6 MiB in all
        mirror.clock.advance(1)
        assert sha256(await get(mirror, digest)) == digest
        if i == 2:  # the oldest blob is used again: now recently used
            mirror.clock.advance(1)
            await get(mirror, digests[0])
        await evictor.evict()
        assert store_bytes(mirror) <= 1024 * KiB

    assert store_bytes(mirror) <= 1024 * KiB
    # Evicted files are unlinked, not left where eviction moved them.
    assert not any(mirror.config.cache.dir.glob("tmp/*"))
    assert await metric(mirror, "mirror_evictions_total") > 0
    assert await metric(mirror, "mirror_cache_size_bytes") == store_bytes(mirror)
    # The newest blob survived; the oldest untouched one was evicted and
    # pulls again from upstream.
    before = upstream.count("blob", "GET")
    assert sha256(await get(mirror, digests[-1])) == digests[-1]
    assert upstream.count("blob", "GET") == before
    assert sha256(await get(mirror, digests[1])) == digests[1]
    assert upstream.count("blob", "GET") == before + 1


async def test_recently_used_blob_survives_eviction(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    digests = [upstream.add_blob(blob(10 + i, 300 * KiB)) for i in range(3)]
    mirror = await make_mirror(upstream, cache_max_size="700KiB")
    evictor = mirror.client.app[EVICTOR]
    for digest in digests[:2]:
        mirror.clock.advance(10)
        await get(mirror, digest)
    mirror.clock.advance(10)
    await get(mirror, digests[0])  # touch the first again
    mirror.clock.advance(10)
    await get(mirror, digests[2])
    await evictor.evict()
    cached = {p.name for p in mirror.config.cache.dir.glob("blobs/*/*/*")}
    assert digests[0][7:] in cached
    assert digests[2][7:] in cached
    assert digests[1][7:] not in cached


async def test_blob_being_served_is_not_evicted(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    big = blob(20, 16 * 1024 * KiB)
    digest = upstream.add_blob(big)
    mirror = await make_mirror(upstream, cache_max_size="20MiB")
    await get(mirror, digest)  # cached now
    evictor = mirror.client.app[EVICTOR]
    evictor.max_size = 1024  # the budget shrinks while a client is reading

    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    first = await resp.content.read(64 * KiB)  # the response is in flight
    result = await evictor.evict()
    assert result.evicted == 0
    rest = await resp.read()
    assert sha256(first + rest) == digest
    # Once the response is done, the blob is fair game.
    pins = mirror.client.app[CACHE].pins
    for _ in range(100):
        if digest not in pins:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the blob stayed pinned after its response ended")
    assert (await evictor.evict()).evicted == 1
    assert store_bytes(mirror) == 0


async def test_blob_larger_than_the_budget_streams_through_uncached(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    size = 80 * 1024 * KiB  # well past the download's memory window
    data = blob(30, size)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream, cache_max_size="1MiB")
    fetched = 'mirror_upstream_bytes_total{kind="blob",registry="docker.io"}'

    # A reader that stops after 1 MiB: uncached, the download is paced by
    # it, so upstream stops being read once the window is full.
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    received = bytearray(await resp.content.readexactly(1024 * KiB))
    plateau = await steady_metric(mirror, fetched)
    assert WINDOW <= plateau <= len(received) + WINDOW + 16 * 1024 * KiB
    while chunk := await resp.content.read(1024 * KiB):
        received += chunk
    assert len(received) == size
    assert sha256(bytes(received)) == digest

    # Another pull downloads it again: nothing was kept.
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert sha256(await resp.read()) == digest
    assert upstream.count("blob", "GET") == 2
    assert store_bytes(mirror) == 0
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("tmp/*"))
    too_large = 'mirror_uncached_downloads_total{reason="too_large"}'
    assert await metric(mirror, too_large) == 2


async def steady_metric(mirror: Mirror, name: str) -> float:
    """The metric's value once it stopped changing for 0.3 s (bounded)."""
    last, steady_since = -1.0, asyncio.get_running_loop().time()
    for _ in range(200):
        value = await metric(mirror, name)
        now = asyncio.get_running_loop().time()
        if value != last:
            last, steady_since = value, now
        elif now - steady_since >= 0.3:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never settled (last {last})")


async def test_evicted_blob_of_a_cached_manifest_is_fetched_again(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [blob(40, 400 * KiB)])
    mirror = await make_mirror(upstream, cache_max_size="1MiB")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    manifest = await resp.read()
    for digest in image.blobs:
        await get(mirror, digest)
    evictor = mirror.client.app[EVICTOR]
    evictor.max_size = 1
    await evictor.evict()
    evictor.max_size = 1024 * KiB
    assert store_bytes(mirror) == 0
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert await resp.read() == manifest
    for digest in image.blobs:
        assert sha256(await get(mirror, digest)) == digest


async def test_stalled_client_does_not_stall_others_on_an_uncached_blob(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    # Uncached (too large), and well beyond the memory window plus what the
    # socket buffers of a client that stops reading can absorb.
    data = blob(31, 64 * 1024 * KiB)
    digest = upstream.add_blob(data)
    upstream.stall = asyncio.Event()  # both clients attach before the headers
    mirror = await make_mirror(
        upstream, cache_max_size="1MiB", upstream_read_timeout="300ms"
    )
    path = f"/v2/library/x/blobs/{digest}"
    stalled = asyncio.create_task(mirror.client.get(path))
    reader = asyncio.create_task(mirror.client.get(path))
    await asyncio.sleep(0.1)
    upstream.stall.set()
    stalled_resp, resp = await stalled, await reader
    await stalled_resp.content.read(KiB)  # ...and then reads no more
    assert sha256(await resp.read()) == digest
    assert upstream.count("blob", "GET") == 1
    with pytest.raises(aiohttp.ClientPayloadError):
        await stalled_resp.read()


async def test_eviction_keeps_min_free_on_the_disk_within_the_budget(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    digests = [upstream.add_blob(blob(50 + i, 200 * KiB)) for i in range(4)]
    mirror = await make_mirror(upstream, cache_max_size="1GiB", cache_min_free="1MiB")
    evictor = mirror.client.app[EVICTOR]
    for digest in digests:
        mirror.clock.advance(10)
        await get(mirror, digest)
    assert (await evictor.evict()).evicted == 0  # far within the budget

    # The disk fills up from elsewhere: 300 KiB short of min_free.
    real = shutil.disk_usage

    def short_of_space(path: object) -> object:
        usage = real(path)  # type: ignore[arg-type]
        return type(usage)(usage.total, usage.total - 700 * KiB, 700 * KiB)

    monkeypatch.setattr(shutil, "disk_usage", short_of_space)
    result = await evictor.evict()
    # The two least recently used blobs make the 300 KiB.
    assert (result.evicted, result.freed) == (2, 400 * KiB)
    cached = {p.name for p in mirror.config.cache.dir.glob("blobs/*/*/*")}
    assert cached == {d[7:] for d in digests[2:]}


async def test_a_stalled_reader_of_an_uncached_blob_is_dropped_and_others_go_on(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    size = 80 * 1024 * KiB  # well past the download's memory window
    data = blob(31, size)
    digest = upstream.add_blob(data)
    upstream.gate = asyncio.Event()  # both readers attach before bytes flow
    mirror = await make_mirror(upstream, upstream_read_timeout="1s")

    write = download._write_all
    full = asyncio.Event()

    def filling_up(fd: int, chunk: bytes) -> None:
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(fd, chunk)

    monkeypatch.setattr(download, "_write_all", filling_up)
    url = f"/v2/library/x/blobs/{digest}"
    stalled = await mirror.client.get(url)
    reading = await mirror.client.get(url)
    assert (stalled.headers["X-Mirror-Cache"], reading.headers["X-Mirror-Cache"]) == (
        "miss",
        "joined",
    )
    # The disk fills up: the download goes on uncached, paced by its readers.
    full.set()
    upstream.gate.set()
    received = bytearray(await stalled.content.readexactly(1024 * KiB))

    # The other reader is held back by the window until, upstream.read_timeout
    # later, the stalled one is given up on; then it reads to the end.
    whole = bytearray()
    async with asyncio.timeout(30):  # not held back for good
        while chunk := await reading.content.read(1024 * KiB):
            whole += chunk
    assert sha256(bytes(whole)) == digest

    async def read_rest() -> None:
        while chunk := await stalled.content.read(1024 * KiB):
            received.extend(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_rest()  # cut short: it was dropped
    assert len(received) < size
    assert upstream.count("blob", "GET") == 1


def stuck_disk(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Temp-file writes block until the event is set (30 s at most)."""
    write = download._write_all
    disk = threading.Event()

    def stuck(fd: int, chunk: bytes) -> None:
        if not disk.wait(timeout=30):
            raise OSError(errno.EIO, "the test's disk never came back")
        write(fd, chunk)

    monkeypatch.setattr(download, "_write_all", stuck)
    return disk


async def test_downloads_together_hold_no_more_memory_than_download_memory(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk stops taking writes: three downloads fill their windows, but
    # together only up to upstream.download_memory (plus the 1 MiB each may
    # always hold, and the batch that crossed the line).
    upstream = FakeRegistry()
    blobs = [blob(50 + n, 12 * 1024 * KiB) for n in range(3)]
    digests = [upstream.add_blob(data) for data in blobs]
    mirror = await make_mirror(upstream, upstream_download_memory="4MiB")
    disk = stuck_disk(monkeypatch)
    responses = [
        await mirror.client.get(f"/v2/library/x/blobs/{digest}") for digest in digests
    ]
    bound = 4 * 1024 * KiB + 3 * (MIN_WINDOW + READ_CHUNK)
    fetched = 'mirror_upstream_bytes_total{kind="blob",registry="docker.io"}'
    held = "mirror_blob_download_memory_bytes"
    plateau = await steady_metric(mirror, fetched)
    assert 4 * 1024 * KiB < plateau <= bound, plateau
    assert 4 * 1024 * KiB < await metric(mirror, held) <= bound

    disk.set()  # the disk is back: every download completes, cached and whole
    for response, digest in zip(responses, digests, strict=True):
        assert sha256(await response.read()) == digest
    await mirror.settle()
    assert await metric(mirror, held) == 0
    assert store_bytes(mirror) == 3 * 12 * 1024 * KiB
    assert upstream.count("blob", "GET") == 3


async def held_above(mirror: Mirror, size: int) -> None:
    """Wait until downloads hold more than `size` bytes in memory."""
    for _ in range(500):
        if await metric(mirror, HELD) > size:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{HELD} never went above {size}")


HELD = "mirror_blob_download_memory_bytes"


async def test_a_failed_download_gives_its_memory_back(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upstream cuts the body while the disk holds it all in memory.
    upstream = FakeRegistry()
    data = blob(60, 12 * 1024 * KiB)
    digest = upstream.add_blob(data)
    upstream.truncate[digest] = 6 * 1024 * KiB
    mirror = await make_mirror(upstream, upstream_resume_attempts="0")
    disk = stuck_disk(monkeypatch)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await held_above(mirror, -1)  # the scrape answers
    try:
        async with asyncio.timeout(10):
            await mirror.client.app[CACHE].idle()
        assert await metric(mirror, HELD) == 0
    finally:
        disk.set()


async def test_an_uncached_download_whose_reader_left_gives_its_memory_back(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    data = blob(61, 12 * 1024 * KiB)
    digest = upstream.add_blob(data)
    mirror = await make_mirror(upstream, cache_max_size="1MiB")  # too big: uncached
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    await resp.content.readexactly(1024 * KiB)
    await held_above(mirror, 1024 * KiB)
    resp.close()
    await mirror.settle()
    assert await metric(mirror, HELD) == 0


class ChunkedBlobs(FakeRegistry):
    """Sends the blobs in `chunked` without a Content-Length."""

    def __init__(self) -> None:
        super().__init__()
        self.chunked: set[str] = set()

    async def _send_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        if digest not in self.chunked or request.method == "HEAD":
            return await super()._send_blob(request, digest)
        data = self.blobs[digest]
        response = web.StreamResponse(headers={"Docker-Content-Digest": digest})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for offset in range(0, len(data), 64 * KiB):
            await response.write(data[offset : offset + 64 * KiB])
        await response.write_eof()
        return response


@pytest.mark.parametrize("length", ["known", "unknown"])
async def test_an_uncached_download_finishes_while_others_spend_the_memory(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch, length: str
) -> None:
    # One download holds all of upstream.download_memory behind a stuck disk.
    # Another, too big to cache, is paced by its one reader, who has all but
    # the last byte until the digest is checked: the download must not wait
    # for that reader (nor drop it), whatever the budget says.
    monkeypatch.setattr(download, "MIN_WINDOW", 64 * KiB)  # batches are bigger
    upstream = ChunkedBlobs()
    hog = upstream.add_blob(blob(62, 12 * 1024 * KiB))
    big = blob(63, 24 * 1024 * KiB)
    digest = upstream.add_blob(big)
    if length == "unknown":
        upstream.chunked.add(digest)
    mirror = await make_mirror(
        upstream,
        upstream_download_memory="2MiB",
        cache_max_size="16MiB",
        upstream_read_timeout="1s",
    )
    write = download._write_all
    disk = threading.Event()
    hog_fd: list[int] = []

    def stuck(fd: int, chunk: bytes) -> None:
        if not hog_fd:
            hog_fd.append(fd)  # the first download to write is the hog
        if fd == hog_fd[0] and not disk.wait(timeout=30):
            raise OSError(errno.EIO, "the test's disk never came back")
        write(fd, chunk)

    monkeypatch.setattr(download, "_write_all", stuck)
    hog_resp = await mirror.client.get(f"/v2/library/x/blobs/{hog}")
    await held_above(mirror, 2 * 1024 * KiB)  # the hog has spent the budget
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    try:
        async with asyncio.timeout(10):
            assert sha256(await resp.read()) == digest
    finally:
        disk.set()
    assert sha256(await hog_resp.read()) == hog


async def test_a_write_in_flight_when_its_download_fails_lands_in_its_own_file(
    make_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The download fails (upstream cuts it) while a write of its temp file
    # is stuck in a worker thread. Cancelling the writer does not stop that
    # thread, so the descriptor must stay open until the write ends: closed
    # under it, the write would land in whatever file took the number next.
    upstream = FakeRegistry()
    data = blob(64, 12 * 1024 * KiB)
    digest = upstream.add_blob(data)
    upstream.truncate[digest] = 6 * 1024 * KiB
    mirror = await make_mirror(upstream, upstream_resume_attempts="0")
    write = download._write_all
    disk = threading.Event()
    seen: list[tuple[int, int]] = []  # (fd, inode) of the first write
    ended: list[OSError | None] = []  # how each write that was held ended

    def stuck(fd: int, chunk: bytes) -> None:
        if not seen:
            seen.append((fd, os.fstat(fd).st_ino))
        disk.wait(timeout=30)
        try:
            if os.fstat(fd).st_ino != seen[0][1]:
                raise OSError(errno.EBADF, "the descriptor is another file's now")
            write(fd, chunk)
        except OSError as exc:
            ended.append(exc)
            raise
        ended.append(None)

    monkeypatch.setattr(download, "_write_all", stuck)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    async with asyncio.timeout(10):
        await mirror.client.app[CACHE].idle()  # failed and cleaned up
    assert seen, "no write was in flight"
    disk.set()
    for _ in range(500):  # the held write ends in its thread
        if ended:
            break
        await asyncio.sleep(0.01)
    assert ended == [None]  # into its own file, still open
    assert not any(mirror.config.cache.dir.glob("blobs/*/*/*"))
