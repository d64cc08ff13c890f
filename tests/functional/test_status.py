"""The status page: `GET /` and `/status.json` after real pulls, compared
with /metrics at the same moment; escaping, bounds, where it is served and
who may see it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from mirror.app import STATS
from mirror.stats import MINUTES, RequestHistory, Stats, TopRepositories
from tests.conftest import FakeClock, Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.functional.conftest import ServeFactory
from tests.functional.test_client_auth import basic, htpasswd
from tests.promtext import parse_samples

KiB = 1024
HOSTILE = '</script><img src=x onerror="alert(1)">&amp;\u2028'
_DATA_RE = re.compile(
    r'<script id="status-data" type="application/json">(.*?)</script>', re.DOTALL
)


async def status_json(mirror: Mirror) -> dict[str, Any]:
    resp = await mirror.client.get("/status.json")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    data: dict[str, Any] = await resp.json()
    return data


async def scrape(mirror: Mirror) -> dict[str, float]:
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    return parse_samples(await resp.text())


def by_cache(samples: dict[str, float], result: str) -> float:
    """Requests with this cache result, summed over routes."""
    prefix = f'mirror_http_request_duration_seconds_count{{cache="{result}",'
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def embedded(html: str) -> dict[str, Any]:
    match = _DATA_RE.search(html)
    assert match is not None, "no status-data block in the page"
    data: dict[str, Any] = json.loads(match.group(1))
    return data


async def pull(mirror: Mirror, repository: str, tag: str = "1") -> None:
    """What a client does: the manifest by tag, then every blob it names."""
    resp = await mirror.client.get(f"/v2/{repository}/manifests/{tag}")
    assert resp.status == 200, await resp.text()
    manifest = json.loads(await resp.read())
    for descriptor in [manifest["config"], *manifest["layers"]]:
        blob = await mirror.client.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
        assert blob.status == 200
        assert len(await blob.read()) == descriptor["size"]
    await mirror.settle()


async def test_status_after_pulls_matches_metrics(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry(ratelimit=50)
    image = upstream.push_image("library/app", "1", [b"a" * 3000, b"b" * 5000])
    upstream.push_image("team/tool", "2", [b"c" * 700])
    mirror = await make_mirror(upstream, cache_max_size="10MiB")
    await pull(mirror, "library/app")  # miss: the manifest and 3 blobs
    await pull(mirror, "library/app")  # hit: all 4 again
    await pull(mirror, "team/tool", "2")  # miss: 3 more

    data = await status_json(mirror)
    samples = await scrape(mirror)

    app_bytes = sum(len(upstream.blobs[d]) for d in image.blobs)
    stored = sum(len(b) for b in upstream.blobs.values())
    cache = data["cache"]
    assert cache["size_bytes"] == stored == samples["mirror_cache_size_bytes"]
    assert cache["blobs"] == 5 == samples["mirror_cache_blobs"]  # 3 + 2
    assert cache["max_size_bytes"] == 10 * 1024 * KiB
    assert cache["max_size_bytes"] == samples["mirror_cache_max_size_bytes"]
    assert cache["min_free_bytes"] == samples["mirror_cache_min_free_bytes"]
    assert cache["disk_free_bytes"] > 0
    assert cache["evictions"] == samples["mirror_evictions_total"] == 0
    assert data["downloads"] == {"in_progress": 0, "queued": 0}
    assert samples["mirror_blob_downloads_in_progress"] == 0
    assert samples["mirror_blob_downloads_queued"] == 0
    served = data["served_bytes"]
    assert served["cache"] == samples['mirror_served_bytes_total{source="cache"}']
    assert served["upstream"] == samples['mirror_served_bytes_total{source="upstream"}']
    assert served["cache"] == app_bytes  # the second pull of library/app

    requests = data["requests"]
    assert requests["totals"] == {
        "hit": 4,
        "miss": 7,
        "joined": 0,
        "stale": 0,
        "uncached": 0,
    }
    for result, count in requests["totals"].items():
        assert by_cache(samples, result) == count, result
    minutes = requests["minutes"]
    assert len(minutes) == MINUTES
    now = mirror.clock()
    assert minutes[-1]["start"] == now - now % 60
    assert (minutes[-1]["hit"], minutes[-1]["miss"]) == (4, 7)
    assert all(m["hit"] == m["miss"] == 0 for m in minutes[:-1])
    assert requests["last_hour"]["lookups"] == 11
    assert requests["last_hour"]["hit_ratio"] == round(4 / 11, 4)

    assert data["top_repositories"] == [
        {"registry": "docker.io", "repository": "library/app", "pulls": 2},
        {"registry": "docker.io", "repository": "team/tool", "pulls": 1},
    ]

    [registry] = data["registries"]
    assert registry["name"] == "docker.io"
    assert registry["state"] == "up"
    assert registry["up"] is True
    assert samples['mirror_upstream_up{registry="docker.io"}'] == 1
    assert registry["throttled"] is False
    assert samples['mirror_upstream_throttled{registry="docker.io"}'] == 0
    assert registry["credentials_rejected"] is False
    budget = registry["budget"]
    assert budget == {"limit": 100, "remaining": 48, "window_seconds": 21600}
    assert samples['mirror_upstream_ratelimit_remaining{registry="docker.io"}'] == 48
    assert samples['mirror_upstream_ratelimit_limit{registry="docker.io"}'] == 100
    assert data["ready"] is True
    assert samples["mirror_ready"] == 1
    assert data["problems"] == []
    assert data["schema"] == 1

    # A minute later the counts move one bucket back; an hour later, out.
    mirror.clock.advance(60)
    later = (await status_json(mirror))["requests"]
    assert (later["minutes"][-2]["hit"], later["minutes"][-2]["miss"]) == (4, 7)
    assert later["minutes"][-1]["hit"] == 0
    mirror.clock.advance(3600)
    gone = (await status_json(mirror))["requests"]
    assert gone["last_hour"]["lookups"] == 0
    assert gone["last_hour"]["hit_ratio"] is None
    assert gone["totals"]["hit"] == 4  # totals are since start


async def test_a_budget_no_header_told_is_not_reported(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"layer"])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/app")
    [registry] = (await status_json(mirror))["registries"]
    assert registry["budget"] == {
        "limit": None,
        "remaining": None,
        "window_seconds": None,
    }
    assert "mirror_upstream_ratelimit_remaining" not in str(await scrape(mirror))


async def test_an_upstream_that_fails_shows_down(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    mirror = await make_mirror(upstream, upstream_down_backoff="30s")
    upstream.fail_statuses = [503] * 20
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503
    [registry] = (await status_json(mirror))["registries"]
    assert registry["state"] == "down"
    assert registry["up"] is False
    assert registry["down_for_seconds"] == 30
    assert (await scrape(mirror))['mirror_upstream_up{registry="docker.io"}'] == 0


async def test_rejected_credentials_show_as_a_readiness_problem(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True, users={"ci-bot": "s3cret"})
    upstream.push_image("library/app", "1", [b"g" * 100])
    mirror = await make_mirror(
        upstream, upstream_username="ci-bot", upstream_password="wrong"
    )
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 403
    data = await status_json(mirror)
    assert data["ready"] is False
    assert data["problems"] == ["docker.io rejected the configured credentials"]
    [registry] = data["registries"]
    assert registry["credentials_rejected"] is True
    assert (await scrape(mirror))["mirror_ready"] == 0
    assert embedded(await (await mirror.client.get("/")).text())["ready"] is False


async def test_the_page_is_one_self_contained_document(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"layer" * 100])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/app")
    resp = await mirror.client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    html = await resp.text()
    assert html.startswith("<!DOCTYPE html>")
    # Nothing is loaded from anywhere: no external script, style, font or
    # image, and the policy would block one if it were there.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html
    assert "url(" not in html
    policy = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    # The one inline script and style are allowed by their hashes.
    for tag in ("script", "style"):
        [source] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy
    data = embedded(html)
    fresh = await status_json(mirror)
    assert data["cache"] == fresh["cache"] | {
        "disk_free_bytes": data["cache"]["disk_free_bytes"]
    }
    assert data["top_repositories"] == fresh["top_repositories"]
    # Stable ids the script fills in (and docs/status-page.md lists).
    for element in ("cache-size", "cache-blobs", "hit-chart", "usage-bar"):
        assert f'id="{element}"' in html

    head = await mirror.client.head("/")
    assert head.status == 200
    assert await head.read() == b""


async def test_html_escapes_a_hostile_repository_name(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await make_mirror()
    # The registry API refuses such a name before it could be counted...
    resp = await mirror.client.get("/v2/a%3Cb/manifests/1")
    assert resp.status == 400
    assert (await status_json(mirror))["top_repositories"] == []
    # ...but whatever the history holds is escaped on the page.
    mirror.client.app[STATS].pulled("docker.io", HOSTILE)
    html = await (await mirror.client.get("/")).text()
    assert "<img" not in html
    # Not entity-escaped either: inside <script> that would change the value.
    assert "&amp;" not in html.split('<script id="status-data"')[1]
    assert html.count("</script>") == 2  # the data block's and the script's own
    data = embedded(html)
    assert data["top_repositories"][0]["repository"] == HOSTILE
    assert (await status_json(mirror))["top_repositories"][0]["repository"] == HOSTILE


async def test_eviction_passes_are_listed(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    digests = [upstream.add_blob(bytes([i]) * 200 * KiB) for i in range(6)]
    mirror = await make_mirror(
        upstream, cache_max_size="700KiB", cache_low_watermark="50%"
    )
    for digest in digests:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        await resp.read()
        await mirror.settle()
    # The worker runs on its own; the store within budget means its passes
    # are over (the size is updated as a pass ends).
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        data = await status_json(mirror)
        if data["recent_evictions"] and data["cache"]["size_bytes"] <= 700 * KiB:
            break
        assert asyncio.get_running_loop().time() < deadline, data["cache"]
        await asyncio.sleep(0.02)
    samples = await scrape(mirror)
    assert (
        sum(p["blobs"] for p in data["recent_evictions"])
        == samples["mirror_evictions_total"]
    )
    passes = data["recent_evictions"]
    assert sum(p["bytes"] for p in passes) == samples["mirror_evicted_bytes_total"]
    assert all(p["bytes"] == p["blobs"] * 200 * KiB for p in passes)
    assert passes[0]["size_after_bytes"] <= 700 * KiB
    assert passes[0]["time"] == mirror.clock()
    assert data["cache"]["evictions"] == samples["mirror_evictions_total"]


async def test_bad_methods_get_the_oci_error_envelope(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await make_mirror()
    for method, path in (("POST", "/"), ("DELETE", "/status.json"), ("PUT", "/")):
        resp = await mirror.client.request(method, path)
        assert resp.status == 405, (method, path)
        [error] = (await resp.json())["errors"]
        assert error["code"] == "UNSUPPORTED"
    samples = await scrape(mirror)
    assert (
        samples['mirror_http_requests_total{method="POST",route="other",status="405"}']
        == 1
    )
    await mirror.client.get("/")
    await mirror.client.get("/status.json")
    samples = await scrape(mirror)
    assert samples[
        'mirror_http_requests_total{method="GET",route="status",status="200"}'
    ]
    assert samples[
        'mirror_http_requests_total{method="GET",route="status_json",status="200"}'
    ]


async def test_with_htpasswd_the_page_needs_credentials(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    path = htpasswd(tmp_path / "htpasswd", {"ops": "s3cret"})
    mirror = await make_mirror(auth_htpasswd=str(path))
    for page in ("/", "/status.json"):
        resp = await mirror.client.get(page)
        assert resp.status == 401, page
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
        assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        resp = await mirror.client.get(page, headers=basic("ops", "wrong"))
        assert resp.status == 401, page
        resp = await mirror.client.get(page, headers=basic("ops", "s3cret"))
        assert resp.status == 200, page
    # /metrics and the probes stay open, as before.
    assert (await mirror.client.get("/metrics")).status == 200
    assert (await mirror.client.get("/readyz")).status == 200


async def get(url: str, **options: Any) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url, **options) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_the_page_moves_to_the_admin_listener(
    start: ServeFactory, tmp_path: Path
) -> None:
    path = htpasswd(tmp_path / "htpasswd", {"ops": "s3cret"})
    served = await start(server_admin_listen="127.0.0.1:0", auth_htpasswd=str(path))
    admin = f"http://127.0.0.1:{served.admin_port}"
    # No credentials on the admin listener: it is guarded like /metrics.
    code, kind, html = await get(admin + "/")
    assert code == 200
    assert kind == "text/html; charset=utf-8"
    assert embedded(html)["ready"] is True
    code, kind, body = await get(admin + "/status.json")
    assert code == 200
    assert kind.startswith("application/json")
    assert json.loads(body)["registries"][0]["name"] == "docker.io"
    for page in ("/", "/status.json"):
        code, _, body = await get(served.url + page)
        assert code == 404, page
        assert json.loads(body)["errors"][0]["code"] == "NOT_FOUND"


async def test_without_an_admin_listener_the_page_is_on_the_registry_port(
    start: ServeFactory,
) -> None:
    served = await start()
    code, kind, html = await get(served.url + "/")
    assert code == 200
    assert kind == "text/html; charset=utf-8"
    assert embedded(html)["registries"][0]["state"] == "up"


async def test_the_admin_allow_list_guards_the_page(start: ServeFactory) -> None:
    served = await start(
        server_admin_listen="127.0.0.1:0", server_admin_allow_from="10.0.0.0/8"
    )
    code, _, body = await get(f"http://127.0.0.1:{served.admin_port}/status.json")
    assert code == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"


# --- bounds of the history (the Stats object directly) -----------------------


def test_top_repositories_stay_bounded_and_keep_the_hot_ones() -> None:
    top = TopRepositories(max_keys=100)
    for i in range(20_000):
        top.add("docker.io", f"owner/repo{i}")
        if i % 10 == 0:
            top.add("docker.io", "library/hot")
        if i % 25 == 0:
            top.add("ghcr.io", "org/warm")
        assert len(top) <= 100
    ranked = top.top(3)
    assert ranked[0] == ("docker.io", "library/hot", 2000)
    assert ranked[1] == ("ghcr.io", "org/warm", 800)
    assert len(top.top(10)) == 10
    # The newest names survive a trim, so a new favourite can still rise.
    assert ("docker.io", "owner/repo19999") in {(r, n) for r, n, _ in top.top(100)}


def test_request_history_is_a_fixed_ring() -> None:
    clock = FakeClock(0.0)
    history = RequestHistory(clock)
    for minute in range(500):
        for _ in range(minute % 7):
            history.record("hit")
        history.record("miss")
        history.record(None)  # no lookup: not counted
        history.record("bogus")
        clock.advance(60)
    clock.advance(-60)
    minutes = history.minutes()
    assert len(minutes) == MINUTES
    assert len(history._minute) == len(history._counts) == MINUTES
    assert [m.counts["hit"] for m in minutes] == [m % 7 for m in range(440, 500)]
    assert all(m.counts["miss"] == 1 for m in minutes)
    assert [m.start for m in minutes] == [60.0 * m for m in range(440, 500)]
    assert history.totals()["miss"] == 500
    # A gap longer than the ring: every minute shown is empty.
    clock.advance(3 * 3600)
    assert all(sum(m.counts.values()) == 0 for m in history.minutes())


def test_only_the_last_eviction_passes_are_kept() -> None:
    clock = FakeClock(1000.0)
    stats = Stats(clock, evictions_kept=20)
    for i in range(1, 101):
        clock.advance(1)
        stats.evicted(i, i * 10, 5)
    passes = stats.evictions()
    assert len(passes) == 20
    assert [p.blobs for p in passes] == list(range(100, 80, -1))
    assert passes[0].time == 1100.0
