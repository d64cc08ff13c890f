"""Manifests and tags through the mirror: verbatim bytes, TTL, stale serving."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, sha256
from tests.promtext import parse_samples

ALL_MANIFEST_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}


async def with_image(
    make_mirror: MirrorFactory, **settings: str
) -> tuple[Mirror, FakeRegistry]:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"layer-one" * 1000])
    return await make_mirror(upstream, **settings), upstream


async def get_tag(mirror: Mirror, tag: str = "1") -> tuple[int, bytes, dict[str, str]]:
    resp = await mirror.client.get(f"/v2/library/app/manifests/{tag}")
    headers = {k: v for k, v in resp.headers.items() if k.lower() != "x-request-id"}
    assert resp.headers["X-Request-Id"]  # one per request, so it differs
    del headers["Date"]  # the other header that may differ between two requests
    return resp.status, await resp.read(), headers


async def test_tag_within_ttl_costs_no_upstream_request(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="5m")
    status, body, headers = await get_tag(mirror)
    assert headers.pop("X-Mirror-Cache") == "miss"
    before = len(upstream.log)
    mirror.clock.advance(299)
    for _ in range(5):
        again_status, again_body, again = await get_tag(mirror)
        assert again.pop("X-Mirror-Cache") == "hit"
        assert (again_status, again_body, again) == (status, body, headers)
    assert len(upstream.log) == before


async def test_expired_tag_revalidates_with_one_head_and_no_get(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1m")
    status, body, _ = await get_tag(mirror)
    assert status == 200
    gets_before = upstream.count("manifest", "GET")
    mirror.clock.advance(61)
    assert (await get_tag(mirror))[1] == body
    assert upstream.count("manifest", "HEAD") == 1
    assert upstream.count("manifest", "GET") == gets_before


async def test_moved_tag_is_followed_after_ttl(make_mirror: MirrorFactory) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1m")
    _, old_body, _ = await get_tag(mirror)
    new = upstream.push_image("library/app", "1", [b"layer-two" * 1000])

    # Within the TTL the old digest is still served, by design.
    assert (await get_tag(mirror))[1] == old_body
    mirror.clock.advance(61)
    status, body, headers = await get_tag(mirror)
    assert status == 200
    assert body == new.manifest
    assert headers["Docker-Content-Digest"] == new.digest


async def test_stale_tag_served_when_upstream_fails(make_mirror: MirrorFactory) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1m")
    _, body, _ = await get_tag(mirror)
    mirror.clock.advance(61)
    upstream.fail_statuses = [503] * 5
    status, stale_body, headers = await get_tag(mirror)
    assert status == 200
    assert stale_body == body
    assert headers["X-Mirror-Stale"] == "1"


async def test_uncached_tag_with_upstream_down_is_503_unavailable(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror)
    upstream.fail_statuses = [502] * 5
    status, body, headers = await get_tag(mirror)
    assert status == 503
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_unknown_tag_is_404_manifest_unknown(make_mirror: MirrorFactory) -> None:
    mirror, _ = await with_image(make_mirror)
    status, body, _ = await get_tag(mirror, "nope")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_head_of_uncached_tag_spends_no_upstream_get(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror)
    resp = await mirror.client.head("/v2/library/app/manifests/1")
    assert resp.status == 200
    digest = upstream.tags[("library/app", "1")]
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert resp.headers["Content-Length"] == str(len(upstream.manifests[digest][1]))
    assert upstream.count("manifest", "GET") == 0
    # The client's next step, GET by digest, costs exactly one GET.
    resp = await mirror.client.get(f"/v2/library/app/manifests/{digest}")
    assert sha256(await resp.read()) == digest
    assert upstream.count("manifest", "GET") == 1


async def test_manifest_by_digest_is_never_revalidated(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1s")
    digest = upstream.tags[("library/app", "1")]
    path = f"/v2/library/app/manifests/{digest}"
    assert (await mirror.client.get(path)).status == 200
    before = len(upstream.log)
    mirror.clock.advance(86400 * 365)
    upstream.fail_statuses = [503] * 3
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert "X-Mirror-Stale" not in resp.headers
    assert len(upstream.log) == before


async def test_upstream_is_asked_with_every_modern_manifest_type(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror)
    # Docker sends several Accept lines; containerd one comma-joined line.
    await mirror.client.get(
        "/v2/library/app/manifests/1",
        headers=[
            ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ],
    )
    sent = upstream.requests("manifest")[0].headers["Accept"]
    assert {t.strip() for t in sent.split(",")} >= ALL_MANIFEST_TYPES


async def test_multi_arch_index_and_children_cached_verbatim(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    amd = upstream.push_image("library/multi", "amd", [b"amd" * 999])
    arm = upstream.push_image(
        "library/multi", "arm", [b"arm" * 999], architecture="arm64"
    )
    index_digest = upstream.push_index("library/multi", "latest", [amd, arm])
    mirror = await make_mirror(upstream)

    resp = await mirror.client.get("/v2/library/multi/manifests/latest")
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert sha256(await resp.read()) == index_digest
    for child in (amd, arm):
        resp = await mirror.client.get(f"/v2/library/multi/manifests/{child.digest}")
        assert await resp.read() == child.manifest
    gets = upstream.count("manifest", "GET")
    for child in (amd, arm):
        await mirror.client.get(f"/v2/library/multi/manifests/{child.digest}")
    assert upstream.count("manifest", "GET") == gets


async def test_manifest_whose_bytes_do_not_match_digest_is_refused(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    good = b'{"schemaVersion": 2}'
    evil = b'{"schemaVersion": 2, "evil": true}'
    upstream.manifests[sha256(good)] = (OCI_MANIFEST, evil)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/manifests/{sha256(good)}")
    assert resp.status == 503
    # Not cached: a repaired upstream is asked again.
    upstream.manifests[sha256(good)] = (OCI_MANIFEST, good)
    resp = await mirror.client.get(f"/v2/library/x/manifests/{sha256(good)}")
    assert await resp.read() == good
    assert upstream.count("manifest", "GET") == 2


async def test_concurrent_requests_for_an_expired_tag_share_one_head(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1m")
    await get_tag(mirror)
    mirror.clock.advance(61)
    results = await asyncio.gather(*(get_tag(mirror) for _ in range(10)))
    assert {r[0] for r in results} == {200}
    assert upstream.count("manifest", "HEAD") == 1


async def test_short_names_are_normalised_to_library(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror)
    status, body, _ = await get_tag(mirror)
    resp = await mirror.client.get("/v2/app/manifests/1")
    assert resp.status == status == 200
    assert await resp.read() == body
    assert {r.path for r in upstream.requests("manifest")} == {
        "/v2/library/app/manifests/1"
    }


async def test_head_by_digest_of_uncached_manifest_is_only_a_head_upstream(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror)
    digest = upstream.tags[("library/app", "1")]
    resp = await mirror.client.head(f"/v2/library/app/manifests/{digest}")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(upstream.manifests[digest][1]))
    assert upstream.count("manifest", "GET") == 0
    assert upstream.count("manifest", "HEAD") == 1


RESULTS = ("miss", "joined")


async def test_concurrent_gets_of_one_manifest_digest_share_one_upstream_get(
    make_mirror: MirrorFactory,
) -> None:
    # The children of a multi-arch index are fetched by digest: during a herd,
    # one Docker Hub pull for all of them, not one per client.
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"herd" * 100])
    upstream.stall = asyncio.Event()
    mirror = await make_mirror(upstream)
    url = f"/v2/library/app/manifests/{image.digest}"

    async def get() -> tuple[int, bytes]:
        resp = await mirror.client.get(url)
        return resp.status, await resp.read()

    clients = [asyncio.create_task(get()) for _ in range(20)]
    lookups = 'mirror_cache_requests_total{kind="manifest",registry="docker.io",'
    waiting = 0.0
    for _ in range(500):
        samples = parse_samples(await (await mirror.client.get("/metrics")).text())
        waiting = sum(samples.get(f'{lookups}result="{r}"}}', 0) for r in RESULTS)
        if waiting == 20:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"only {waiting} of 20 clients reached the mirror")
    upstream.stall.set()
    assert await asyncio.gather(*clients) == [(200, image.manifest)] * 20
    assert upstream.count("manifest", "GET") == 1


async def test_a_revalidated_tag_is_fresh_for_another_ttl(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(make_mirror, cache_tag_ttl="1m")
    await get_tag(mirror)
    mirror.clock.advance(61)
    await get_tag(mirror)  # expired: one HEAD revalidates it
    assert upstream.count("manifest", "HEAD") == 1
    mirror.clock.advance(59)  # within the TTL counted from the revalidation
    for _ in range(3):
        status, _, headers = await get_tag(mirror)
        assert (status, headers["X-Mirror-Cache"]) == (200, "hit")
    assert upstream.count("manifest", "HEAD") == 1
    mirror.clock.advance(2)  # and expired again
    await get_tag(mirror)
    assert upstream.count("manifest", "HEAD") == 2


async def test_a_stale_tag_is_served_up_to_max_stale_and_not_after(
    make_mirror: MirrorFactory,
) -> None:
    mirror, upstream = await with_image(
        make_mirror, cache_tag_ttl="1m", cache_max_stale="1h", upstream_retries="1"
    )
    _, body, _ = await get_tag(mirror)
    mirror.clock.advance(3600)  # exactly max_stale since upstream confirmed it
    upstream.fail_statuses = [503] * 10
    status, stale_body, headers = await get_tag(mirror)
    assert (status, stale_body, headers["X-Mirror-Cache"]) == (200, body, "stale")
    mirror.clock.advance(1)
    upstream.fail_statuses = [503] * 10
    status, _, _ = await get_tag(mirror)
    assert status == 503
