"""Blob downloads are bounded and queue; manifests never wait behind them.

Regression tests for a starved connection pool: blob downloads used to be
unbounded and shared aiohttp's 100 connections with manifest and token
requests, so 100 distinct uncached blob GETs (whose clients may hang up at
once: downloads outlive clients) made every manifest request wait 30 s for
a connection and fail with 503.
"""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp

from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry, sha256
from tests.promtext import parse_samples

KiB = 1024
# Larger than FakeRegistry's first chunk, so its gate holds every body open.
BLOB_SIZE = 100 * KiB


def blob(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (BLOB_SIZE // 32)


async def metrics(mirror: Mirror) -> dict[str, float]:
    return parse_samples(await (await mirror.client.get("/metrics")).text())


async def until(check: object, mirror: Mirror, what: str) -> dict[str, float]:
    """Poll /metrics until `check(values)` holds (bounded)."""
    for _ in range(500):
        values = await metrics(mirror)
        if check(values):  # type: ignore[operator]
            return values
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}; last {values}")


async def fetch(mirror: Mirror, digest: str) -> tuple[int, bytes]:
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    return resp.status, await resp.read()


async def test_downloads_past_the_bound_queue_and_all_complete(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.push_image("library/app", "1", [b"layer"])
    digests = [upstream.add_blob(blob(i)) for i in range(12)]
    mirror = await make_mirror(upstream, upstream_max_downloads="4")
    pulls = [asyncio.create_task(fetch(mirror, d)) for d in digests]

    values = await until(
        lambda v: (
            v.get("mirror_blob_downloads_queued") == 8
            and upstream.count("blob", "GET") == 4
        ),
        mirror,
        "8 downloads queued behind 4 that reached upstream",
    )
    assert values["mirror_blob_downloads_in_progress"] == 12 - 8
    # All four download connections are held open by the gate; manifests
    # have their own.
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest

    assert upstream.gate is not None
    upstream.gate.set()
    results = await asyncio.gather(*pulls)
    for (status, data), digest in zip(results, digests, strict=True):
        assert status == 200
        assert sha256(data) == digest
    assert upstream.count("blob", "GET") == 12  # queued, never failed or doubled
    values = await metrics(mirror)
    assert values["mirror_blob_downloads_queued"] == 0
    assert values["mirror_blob_download_queue_wait_seconds_count"] == 12


async def test_hundred_abandoned_misses_do_not_starve_manifests(
    make_mirror: MirrorFactory,
) -> None:
    """The reported scenario, with the default bound of 64."""
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.push_image("library/app", "1", [b"layer"])
    digests = [upstream.add_blob(blob(i)) for i in range(100)]
    mirror = await make_mirror(upstream, server_kwargs={"handler_cancellation": True})
    url = mirror.client.make_url("/v2/library/x/blobs/")

    async def hang_up(session: aiohttp.ClientSession, digest: str) -> None:
        async with session.get(f"{url}{digest}") as resp:
            await resp.content.readany()  # headers and a first byte, then go

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # The 36 past the bound send no byte before their download starts:
        # they time out waiting for headers and hang up too.
        timeout = aiohttp.ClientTimeout(total=1.0)
        tasks = [
            asyncio.create_task(asyncio.wait_for(hang_up(session, d), timeout.total))
            for d in digests
        ]
        await asyncio.gather(*tasks, return_exceptions=True)
    await until(
        lambda v: (
            v.get("mirror_blob_downloads_queued") == 0
            and v.get("mirror_blob_downloads_in_progress") == 64
        ),
        mirror,
        "queued downloads whose clients left are dropped",
    )

    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest

    assert upstream.gate is not None
    upstream.gate.set()
    await mirror.settle()
    # The 64 that started finish and are cached; the 36 abandoned in the
    # queue never cost an upstream request.
    assert upstream.count("blob", "GET") == 64
    cached = {p.name for p in mirror.config.cache.dir.glob("blobs/*/*/*")}
    assert len(cached) == 64
    status, data = await fetch(mirror, digests[99])
    assert status == 200
    assert sha256(data) == digests[99]


async def test_a_config_blob_is_not_queued_behind_big_layers(
    make_mirror: MirrorFactory,
) -> None:
    """Blobs a cached manifest declares small get a lane of their own: with
    every regular slot held by a big layer, a pull still gets its config."""
    upstream = FakeRegistry(gate=asyncio.Event())
    big = [hashlib.sha256(b"big%d" % i).digest() * (64 * KiB) for i in range(2)]
    image = upstream.push_image("library/app", "1", big)
    mirror = await make_mirror(upstream, upstream_max_downloads="2")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200  # the manifest declares the sizes
    layers = [asyncio.create_task(fetch(mirror, d)) for d in image.layers]
    await until(
        lambda v: v.get("mirror_blob_downloads_in_progress") == 2,
        mirror,
        "both regular slots held by the gated layers",
    )

    status, config = await asyncio.wait_for(fetch(mirror, image.config_digest), 10)

    assert status == 200
    assert sha256(config) == image.config_digest
    assert not any(task.done() for task in layers)  # still held by the gate
    assert upstream.gate is not None
    upstream.gate.set()
    for (status, data), digest in zip(
        await asyncio.gather(*layers), image.layers, strict=True
    ):
        assert status == 200
        assert sha256(data) == digest
