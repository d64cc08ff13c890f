"""`promtool check metrics` on the real /metrics page after pulls: the
exposition mirror serves passes Prometheus' own linter (naming, units,
counters ending in _total, help text) with no complaint."""

from __future__ import annotations

import asyncio

from tests.conftest import MirrorFactory
from tests.fakes.registry import OCI_MANIFEST, FakeRegistry
from tests.integration.tools import require_tool
from tests.promtext import parse_samples

REPOSITORY = "library/app"


async def promtool_check_metrics(text: str) -> tuple[int, str]:
    """Run `promtool check metrics` on an exposition; (status, output)."""
    process = await asyncio.create_subprocess_exec(
        require_tool("promtool"),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate(text.encode())
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_metrics_after_pulls_pass_promtool_check_metrics(
    make_mirror: MirrorFactory,
) -> None:
    # A registry sending Docker Hub's rate-limit headers, so the budget
    # gauges are on the page too.
    upstream = FakeRegistry(ratelimit=50)
    image = upstream.push_image(REPOSITORY, "1", [b"a" * 4096, b"b" * 70_000])
    mirror = await make_mirror(upstream)
    client = mirror.client
    blobs = image.blobs
    for pull in ("miss", "hit"):
        manifest = await client.get(
            f"/v2/{REPOSITORY}/manifests/1", headers={"Accept": OCI_MANIFEST}
        )
        assert manifest.status == 200
        assert await manifest.read() == image.manifest
        for digest in blobs:
            blob = await client.get(f"/v2/{REPOSITORY}/blobs/{digest}")
            assert blob.status == 200
            assert blob.headers["X-Mirror-Cache"] == pull
            assert await blob.read() == upstream.blobs[digest]
        await mirror.settle()
    missing = await client.get(f"/v2/{REPOSITORY}/manifests/2")
    assert missing.status == 404

    page = await client.get("/metrics")
    assert page.status == 200
    text = await page.text()
    samples = parse_samples(text)
    # The page holds what the pulls did: budget, hits and misses, bytes
    # from cache and from upstream, histograms.
    assert samples['mirror_upstream_ratelimit_remaining{registry="docker.io"}'] == 49
    assert samples['mirror_upstream_ratelimit_limit{registry="docker.io"}'] == 100
    hits = 'mirror_cache_requests_total{kind="blob",registry="docker.io",result="hit"}'
    assert samples[hits] == len(blobs)
    size = sum(len(upstream.blobs[d]) for d in blobs)
    assert samples['mirror_served_bytes_total{source="cache"}'] == size
    assert samples['mirror_served_bytes_total{source="upstream"}'] == size
    assert any(
        name.startswith("mirror_http_request_duration_seconds_bucket{")
        for name in samples
    )
    assert any(
        name.startswith("mirror_upstream_first_byte_seconds_bucket{")
        for name in samples
    )
    assert "process_open_fds" in samples

    status, output = await promtool_check_metrics(text)
    assert (status, output) == (0, ""), f"promtool check metrics:\n{output}"
