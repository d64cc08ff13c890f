"""The mirror process over its life: shutdown, restart, a dead upstream, metrics.

Each test runs its own mirror (and, where it stops it, its own upstream), so
breaking things here cannot disturb the shared session fixtures.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from . import expect
from .conftest import MirrorFactory, Publisher, UpstreamFactory, unique
from .skopeo import Skopeo
from .tools import http_status
from .upstream import Upstream


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample in a Prometheus text exposition, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def test_sigterm_stops_the_mirror_promptly_and_cleanly(
    mirror_factory: MirrorFactory, upstream: Upstream
) -> None:
    mirror = mirror_factory(upstream.url)
    started = time.monotonic()
    status = mirror.stop(timeout=10.0)
    elapsed = time.monotonic() - started
    assert status == 0, f"exit status {status} on SIGTERM\n{mirror.log_text()}"
    assert elapsed < 5.0, f"SIGTERM took {elapsed:.1f}s"
    assert http_status(f"{mirror.url}/v2/") is None


async def test_restart_serves_from_the_same_cache(
    mirror_factory: MirrorFactory,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    published = await publish.multiarch(unique("library/restart-"))
    reference = f"{published.repository}:{published.tag}"
    workdir = tmp_path / "restarted-mirror"

    first = mirror_factory(upstream.url, workdir=workdir)
    before = await skopeo.pull_to_dir(
        first.host, reference, tmp_path / "before", all_images=True
    )
    assert first.stop() == 0, first.log_text()

    second = mirror_factory(upstream.url, workdir=workdir)
    mark = upstream.mark()
    after = await skopeo.pull_to_dir(
        second.host, reference, tmp_path / "after", all_images=True
    )
    assert after == before
    expect.served_from_cache(
        await upstream.requests_since(mark), context="pull after restart"
    )


async def test_dead_upstream_serves_cached_content(
    mirror_factory: MirrorFactory,
    upstream_factory: UpstreamFactory,
    publish: Publisher,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    private = upstream_factory()
    published = await publish.image(unique("library/stale-"), to=private)
    # A zero TTL makes every tag request revalidate upstream, so the tag pull
    # below must take the stale-on-error path rather than a fresh cache hit.
    mirror = mirror_factory(private.url, extra_toml='tag_ttl = "0s"\n')
    by_tag = f"{published.repository}:{published.tag}"
    by_digest = f"{published.repository}@{published.digest}"
    cached = await skopeo.pull_to_dir(mirror.host, by_tag, tmp_path / "warm")

    private.stop()
    assert await skopeo.pull_to_dir(mirror.host, by_tag, tmp_path / "tag") == cached
    assert (
        await skopeo.pull_to_dir(mirror.host, by_digest, tmp_path / "digest") == cached
    )

    async with http.get(f"{mirror.url}/metrics") as response:
        metrics = samples(await response.text())
    assert value(
        metrics,
        "mirror_cache_requests_total",
        registry="docker.io",
        kind="tag",
        result="stale",
    )

    # Content the mirror never saw cannot be served; it must say so quickly.
    url = f"{mirror.url}/v2/library/never-cached/manifests/1"
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
        body = await response.json(content_type=None)
        assert response.status == 503, body
        assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert http_status(f"{mirror.url}/v2/") == 200


async def test_metrics_count_misses_then_hits(
    mirror_factory: MirrorFactory,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    mirror = mirror_factory(upstream.url)
    published = await publish.image(unique("library/metrics-"))
    blobs = len(published.single.blob_digests)
    reference = f"{published.repository}:{published.tag}"

    await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "first")
    await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "second")

    async with http.get(f"{mirror.url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        metrics = samples(await response.text())
    assert value(
        metrics,
        "mirror_cache_requests_total",
        registry="docker.io",
        kind="blob",
        result="miss",
    ) == (blobs)
    # The second pull found each blob cached, or (if it came within the
    # moment between a blob's last byte and its commit) joined its download.
    second_pull = value(
        metrics,
        "mirror_cache_requests_total",
        registry="docker.io",
        kind="blob",
        result="hit",
    ) + value(
        metrics,
        "mirror_cache_requests_total",
        registry="docker.io",
        kind="blob",
        result="joined",
    )
    assert second_pull == blobs
