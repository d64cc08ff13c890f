"""The mirror over a realistic network: late, fragmented, cut, and over TLS.

Upstream is a FakeRegistry reached through a LatencyProxy (tests/fakes/
network.py), which delays every chunk, caps the rate and re-segments the
stream into small pieces, so a body arrives in many reads, as it does from a
registry across a WAN, rather than in one read, as loopback delivers it.
TLS tests serve the FakeRegistry with a certificate from the test CA
(tests/fakes/tls.py) and give the mirror the CA through ``upstream.ca_file``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import MirrorFactory, ProxyFactory
from tests.fakes.network import LatencyProxy, Link, wan
from tests.fakes.registry import OCI_MANIFEST, FakeRegistry, sha256
from tests.fakes.tls import CertificateAuthority, TlsFiles

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Network:
    """A ``make_mirror`` route through a LatencyProxy started for the server."""

    start: ProxyFactory
    options: dict[str, Any] = field(default_factory=dict)
    _proxy: LatencyProxy | None = None

    def __call__(self, server: TestServer) -> str:
        self._proxy = self.start(server.port, **self.options)
        return f"{server.scheme}://{self._proxy.host}"

    @property
    def proxy(self) -> LatencyProxy:
        assert self._proxy is not None, "the mirror was not made with this route"
        return self._proxy


def data(seed: str, size: int) -> bytes:
    """Deterministic, incompressible bytes."""
    return hashlib.shake_256(seed.encode()).digest(size)


def manifest_of_size(size: int) -> bytes:
    """An OCI image manifest of exactly ``size`` bytes (padded annotation)."""
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(b"config"),
            "size": 6,
        },
        "layers": [],
        "annotations": {"pad": ""},
    }
    pad = size - len(json.dumps(manifest).encode())
    manifest["annotations"]["pad"] = data("pad", pad).hex()[:pad]
    body = json.dumps(manifest).encode()
    assert len(body) == size
    return body


async def error_code(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


def blob_gets(upstream: FakeRegistry, digest: str) -> list[dict[str, str]]:
    """Headers of each upstream GET of one blob."""
    return [
        r.headers
        for r in upstream.requests("blob", "GET")
        if r.path.endswith(f"/blobs/{digest}")
    ]


def range_start(headers: dict[str, str]) -> int:
    value = headers["Range"]
    assert value.startswith("bytes="), value
    assert value.endswith("-"), value
    return int(value.removeprefix("bytes=").removesuffix("-"))


# --- manifests arriving in many reads ---------------------------------------


MANIFEST_SIZES = {
    "2KiB": 2 * KiB,
    "256KiB": 256 * KiB,
    "1MiB": MiB,
    "3.5MiB": 3 * MiB + 512 * KiB,
}


@pytest.mark.parametrize(
    "size", MANIFEST_SIZES.values(), ids=list(MANIFEST_SIZES.keys())
)
async def test_manifest_arriving_in_many_small_reads_is_served_whole(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory, size: int
) -> None:
    """Regression: a body split over several reads was taken for one over
    the size limit (a single ``read(limit + 1)`` that came back short)."""
    upstream = FakeRegistry()
    body = manifest_of_size(size)
    digest = upstream.add_manifest("library/app", body, OCI_MANIFEST, tag="1")
    # Small pieces, and pauses often enough (after every piece for the small
    # manifest) that the body cannot arrive in one read.
    response = Link(
        latency=0.01,
        max_segment=1024,
        pause=(0.0005, 0.002),
        pause_chance=min(1.0, 32 * KiB / size),
    )
    network = Network(latency_proxy, {"response": response})
    mirror = await make_mirror(upstream, route=network)

    resp = await mirror.client.get("/v2/library/app/manifests/1")
    got = await resp.read()
    assert resp.status == 200, got[:500]
    assert got == body
    assert sha256(got) == digest
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(size)
    assert network.proxy.counters.bytes_to_client > size
    assert upstream.count("manifest", "GET") == 1

    # Cached whole: by digest it is served without asking upstream.
    again = await mirror.client.get(f"/v2/library/app/manifests/{digest}")
    assert again.status == 200
    assert await again.read() == body
    assert upstream.count("manifest", "GET") == 1


async def test_manifest_body_sent_in_two_parts_300ms_apart_is_served_whole(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(manifest_split=0.3)
    body = manifest_of_size(2 * KiB)
    digest = upstream.add_manifest("library/app", body, OCI_MANIFEST, tag="1")
    mirror = await make_mirror(upstream)

    started = time.monotonic()
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    got = await resp.read()
    assert resp.status == 200, got[:500]
    assert time.monotonic() - started >= 0.3  # the pause really happened
    assert got == body
    assert resp.headers["Docker-Content-Digest"] == digest
    assert upstream.count("manifest", "GET") == 1


# --- blobs ------------------------------------------------------------------


async def test_blobs_over_a_slow_network_reach_concurrent_clients_whole(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory
) -> None:
    upstream = FakeRegistry()
    blobs = {
        upstream.add_blob(content): content
        for content in (
            data("a", 1 * MiB),
            data("b", 3 * MiB + 1),
            data("c", 5 * MiB - 7),
        )
    }
    # Slow enough (8 MiB/s per connection) that every client arrives while
    # the downloads are still running.
    network = Network(latency_proxy, {"request": wan(), "response": wan(rate=8 * MiB)})
    mirror = await make_mirror(upstream, route=network)
    clients = 4

    async def fetch(digest: str) -> tuple[str, int, bytes]:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        return digest, resp.status, await resp.read()

    results = await asyncio.gather(
        *(fetch(digest) for _ in range(clients) for digest in blobs)
    )
    for digest, status, body in results:
        assert status == 200, body[:500]
        assert len(body) == len(blobs[digest])
        assert sha256(body) == digest
    for digest in blobs:
        assert len(blob_gets(upstream, digest)) == 1, upstream.log
    assert network.proxy.counters.bytes_to_client > sum(map(len, blobs.values()))

    await mirror.settle()
    results = await asyncio.gather(*(fetch(digest) for digest in blobs))
    assert all(sha256(body) == digest for digest, _, body in results)
    assert upstream.count("blob", "GET") == len(blobs)


async def test_blob_cut_twice_by_the_network_reaches_every_joined_client_whole(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory
) -> None:
    upstream = FakeRegistry()
    content = data("cut", 2 * MiB)
    digest = upstream.add_blob(content)
    # 4 MiB/s: the other clients join while the first connection is running.
    network = Network(latency_proxy, {"response": wan(latency=0.01, rate=4 * MiB)})
    mirror = await make_mirror(upstream, route=network)
    # The first connection, and the first resume too, each after 300 000 bytes.
    network.proxy.cut(after=300_000, times=2)

    async def fetch() -> tuple[int, bytes]:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        return resp.status, await resp.read()

    for status, body in await asyncio.gather(*(fetch() for _ in range(3))):
        assert status == 200
        assert body == content
    assert network.proxy.counters.cuts == 2
    first, resumed, resumed_again = blob_gets(upstream, digest)
    assert "Range" not in first
    # Less than 300 000 body bytes got through each time (headers came first).
    assert 0 < range_start(resumed) < 300_000
    assert range_start(resumed) < range_start(resumed_again) < 600_000


async def test_blob_stalled_mid_body_is_resumed_after_read_timeout(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory
) -> None:
    upstream = FakeRegistry()
    content = data("stall", 2 * MiB)
    digest = upstream.add_blob(content)
    network = Network(latency_proxy, {"response": wan(latency=0.01)})
    mirror = await make_mirror(upstream, route=network, upstream_read_timeout="500ms")
    network.proxy.stall(after=300_000, times=1)

    started = time.monotonic()
    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    body = await resp.read()

    assert resp.status == 200
    assert body == content
    assert time.monotonic() - started < 10.0
    # The first connection is still held: the mirror gave up on it.
    assert network.proxy.counters.stalled == 1
    first, resumed = blob_gets(upstream, digest)
    assert "Range" not in first
    assert 0 < range_start(resumed) < 300_000


async def test_resumes_are_bounded_even_when_each_brings_bytes(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory
) -> None:
    upstream = FakeRegistry()
    content = data("bounded", 2 * MiB)
    digest = upstream.add_blob(content)
    network = Network(latency_proxy, {"response": wan(latency=0.01)})
    mirror = await make_mirror(upstream, route=network, upstream_resume_attempts="2")
    network.proxy.cut(after=300_000, times=None)  # every connection

    resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # cut short of Content-Length, never completed wrong

    await mirror.settle()
    gets = blob_gets(upstream, digest)
    assert len(gets) == 3  # the first try and two resumes, each further on
    assert 0 < range_start(gets[1]) < range_start(gets[2]) < 2 * MiB
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))


@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_manifest_cut_mid_body_is_asked_for_again(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory, fault: str
) -> None:
    """A broken manifest body is retried (a 503 would send Docker to Docker
    Hub itself, spending a pull there instead)."""
    upstream = FakeRegistry()
    body = manifest_of_size(200_000)
    digest = upstream.add_manifest("library/app", body, OCI_MANIFEST, "1")
    network = Network(latency_proxy, {"response": wan(latency=0.01)})
    mirror = await make_mirror(upstream, route=network, upstream_read_timeout="500ms")
    if fault == "cut":
        network.proxy.cut(after=50_000, times=1)
    else:
        network.proxy.stall(after=50_000, times=1)

    resp = await mirror.client.get("/v2/library/app/manifests/1")

    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Docker-Content-Digest"] == digest
    assert upstream.count("manifest", "GET") == 2


async def test_refused_upstream_fails_fast_and_cached_tags_are_served_stale(
    make_mirror: MirrorFactory, latency_proxy: ProxyFactory
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [data("layer", 10_000)])
    upstream.push_image("library/other", "1", [data("other", 10_000)])
    network = Network(latency_proxy, {"request": wan(), "response": wan()})
    mirror = await make_mirror(upstream, route=network, cache_tag_ttl="1m")
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    requests = len(upstream.log)

    network.proxy.refuse()
    network.proxy.reset()  # no pooled connection may carry on
    mirror.clock.advance(61)
    started = time.monotonic()
    stale = await mirror.client.get("/v2/library/app/manifests/1")
    assert stale.status == 200
    assert stale.headers.get("X-Mirror-Stale") == "1"
    assert await stale.read() == image.manifest
    uncached = await mirror.client.get("/v2/library/other/manifests/1")
    assert uncached.status == 503
    assert await error_code(uncached) == "UNAVAILABLE"
    assert time.monotonic() - started < 5.0
    assert len(upstream.log) == requests  # nothing got through

    network.proxy.accept()
    mirror.clock.advance(61)  # past down_backoff, and the TTL again
    fresh = await mirror.client.get("/v2/library/other/manifests/1")
    assert fresh.status == 200


# --- TLS ----------------------------------------------------------------------


@pytest.mark.parametrize("slow", [False, True], ids=["loopback", "slow-network"])
async def test_pulls_from_a_tls_upstream_trusted_through_ca_file(
    make_mirror: MirrorFactory,
    latency_proxy: ProxyFactory,
    tls_files: TlsFiles,
    slow: bool,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image(
        "library/app", "1", [data("tls-1", 300_000), data("tls-2", 2 * MiB)]
    )
    network = Network(latency_proxy, {"request": wan(), "response": wan()})
    mirror = await make_mirror(
        upstream,
        server_ssl=tls_files.server_context(),
        route=network if slow else None,
        upstream_ca_file=str(tls_files.ca_file),
    )
    assert mirror.config.upstream.url.startswith("https://127.0.0.1:")

    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    for digest in image.blobs:
        blob = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        assert blob.status == 200
        assert sha256(await blob.read()) == digest
        assert len(blob_gets(upstream, digest)) == 1
    if slow:
        assert network.proxy.counters.bytes_to_client > 2 * MiB


@pytest.mark.parametrize("trust", ["system-only", "another-ca", "wrong-host"])
async def test_untrusted_tls_upstream_is_unavailable(
    make_mirror: MirrorFactory, tls_files: TlsFiles, tmp_path: Path, trust: str
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [data("untrusted", 1000)])
    server = tls_files
    settings: dict[str, str] = {}
    if trust == "another-ca":
        other = CertificateAuthority("some other CA").write(tmp_path / "other.pem")
        settings["upstream_ca_file"] = str(other)
    elif trust == "wrong-host":
        server = TlsFiles.create(tmp_path / "elsewhere", hosts=["registry.example"])
        settings["upstream_ca_file"] = str(server.ca_file)
    mirror = await make_mirror(upstream, server_ssl=server.server_context(), **settings)

    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503, await resp.text()
    assert await error_code(resp) == "UNAVAILABLE"
    assert "certificate" in (await resp.text()).lower()
    # Refused during the handshake: no request reached the registry.
    assert upstream.log == []
