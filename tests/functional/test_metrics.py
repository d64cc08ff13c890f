"""What /metrics says after real requests: build and process facts, request
durations by cache result, upstream time to first byte, throttling, disk."""

from __future__ import annotations

import platform
import shutil

from mirror import __revision__, __version__
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.promtext import parse_samples


async def scrape(mirror: Mirror) -> tuple[str, dict[str, float]]:
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    return text, parse_samples(text)


def duration_count(samples: dict[str, float], route: str, cache: str) -> float:
    name = "mirror_http_request_duration_seconds_count"
    return samples.get(f'{name}{{cache="{cache}",route="{route}"}}', 0.0)


async def test_build_info_and_process_metrics_are_exported(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await make_mirror()
    text, samples = await scrape(mirror)
    labels = (
        f'python="{platform.python_version()}",'
        f'revision="{__revision__}",version="{__version__}"'
    )
    assert samples[f"mirror_build_info{{{labels}}}"] == 1
    assert samples["process_open_fds"] > 0
    assert samples["process_max_fds"] >= samples["process_open_fds"]
    assert samples["process_resident_memory_bytes"] > 1_000_000
    assert "process_cpu_seconds_total" in samples
    assert samples["mirror_ready"] == 1
    # Nothing reads them, and they would double the page.
    assert "_created" not in text


async def test_request_durations_are_labelled_by_what_the_cache_did(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"layer" * 1000])
    mirror = await make_mirror(upstream, cache_tag_ttl="1m")
    layer = image.layers[0]

    for expected in ("miss", "hit"):
        resp = await mirror.client.get(f"/v2/library/app/blobs/{layer}")
        assert resp.status == 200
        assert resp.headers["X-Mirror-Cache"] == expected
        await resp.read()
        await mirror.settle()
        resp = await mirror.client.get("/v2/library/app/manifests/1")
        assert resp.status == 200
        assert resp.headers["X-Mirror-Cache"] == expected
    assert (await mirror.client.get("/v2/library/app/tags/list")).status == 200
    assert (await mirror.client.get("/v2/")).status == 200
    mirror.clock.advance(61)
    upstream.fail_statuses = [503] * 5
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert resp.headers["X-Mirror-Cache"] == "stale"

    _, samples = await scrape(mirror)
    assert duration_count(samples, "blob", "miss") == 1
    assert duration_count(samples, "blob", "hit") == 1
    assert duration_count(samples, "manifest", "miss") == 1
    assert duration_count(samples, "manifest", "hit") == 1
    assert duration_count(samples, "manifest", "stale") == 1
    assert duration_count(samples, "tags", "uncached") == 1
    assert duration_count(samples, "base", "none") == 1


async def test_a_blob_too_large_to_cache_is_counted_uncached(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/big", "1", [b"x" * 300_000])
    mirror = await make_mirror(upstream, cache_max_size="100KiB")
    resp = await mirror.client.get(f"/v2/library/big/blobs/{image.layers[0]}")
    assert resp.status == 200
    assert len(await resp.read()) == 300_000
    await mirror.settle()
    _, samples = await scrape(mirror)
    assert duration_count(samples, "blob", "uncached") == 1
    assert duration_count(samples, "blob", "miss") == 0


async def test_upstream_first_byte_is_timed_per_request(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"a" * 100, b"b" * 100])
    mirror = await make_mirror(upstream)
    for digest in image.layers:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        await resp.read()
    await mirror.settle()
    _, samples = await scrape(mirror)
    labels = 'kind="blob",registry="docker.io"'
    timed = f"mirror_upstream_first_byte_seconds_count{{{labels}}}"
    sent = f'mirror_upstream_requests_total{{{labels},result="200"}}'
    assert samples[sent] == 2
    assert samples[timed] == 2
    assert upstream.count("blob", "GET") == 2


async def test_throttled_gauge_follows_a_429_until_retry_after(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(ratelimit=0)
    upstream.push_image("library/app", "1", [b"e" * 100])
    mirror = await make_mirror(upstream)
    name = 'mirror_upstream_throttled{registry="docker.io"}'
    _, samples = await scrape(mirror)
    assert samples[name] == 0
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 429
    _, samples = await scrape(mirror)
    assert samples[name] == 1
    mirror.clock.advance(31)  # the fake's Retry-After is 30 s
    _, samples = await scrape(mirror)
    assert samples[name] == 0


async def test_rate_limit_gauges_appear_only_once_upstream_reports_a_budget(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(ratelimit=40, ratelimit_limit=100)
    upstream.push_image("library/app", "1", [b"e" * 100])
    mirror = await make_mirror(upstream)
    text, _ = await scrape(mirror)
    assert "mirror_upstream_ratelimit_remaining{" not in text
    assert "mirror_upstream_ratelimit_limit{" not in text
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    _, samples = await scrape(mirror)
    assert samples['mirror_upstream_ratelimit_limit{registry="docker.io"}'] == 100
    assert samples['mirror_upstream_ratelimit_remaining{registry="docker.io"}'] == 39


async def test_free_disk_and_min_free_are_exported(make_mirror: MirrorFactory) -> None:
    mirror = await make_mirror(cache_min_free="3MiB")
    _, samples = await scrape(mirror)
    assert samples["mirror_cache_min_free_bytes"] == 3 * 1024 * 1024
    free = shutil.disk_usage(mirror.config.cache.dir).free
    # Read at the scrape; other processes write to the disk meanwhile.
    assert abs(samples["mirror_cache_disk_free_bytes"] - free) < 256 * 1024 * 1024


async def test_ready_gauge_drops_when_credentials_are_rejected(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True, users={"ci-bot": "right"})
    upstream.push_image("someuser/private", "1", [b"f" * 100])
    mirror = await make_mirror(
        upstream, upstream_username="ci-bot", upstream_password="wrong"
    )
    resp = await mirror.client.get("/v2/someuser/private/manifests/1")
    assert resp.status in (401, 403, 503)
    ready = await mirror.client.get("/readyz")
    assert ready.status == 503
    _, samples = await scrape(mirror)
    assert samples["mirror_ready"] == 0
