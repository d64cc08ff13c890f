"""The pull path over real HTTP: mirror app in front of a FakeRegistry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

from tests.conftest import MirrorFactory
from tests.fakes.registry import OCI_MANIFEST, FakeRegistry, sha256


def layer(n: int, size: int = 300_000) -> bytes:
    return os.urandom(16) * 0 + hashlib.sha256(str(n).encode()).digest() * (size // 32)


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
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    body = b""
    try:
        body = await resp.read()
    except Exception:  # noqa: BLE001 - the point is that reading fails
        pass
    assert len(body) < len(data)

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
