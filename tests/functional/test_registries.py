"""Several upstream registries through one mirror: routing by `ns` and by path
prefix, separate tags and state per registry, shared content, policy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.app import RELOAD
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.fakes.tls import TlsFiles
from tests.promtext import parse_samples

ServerFactory = Callable[..., Awaitable[TestServer]]
GHCR, QUAY = "ghcr.io", "quay.io"
GHCR_APP = "/v2/ghcr.io/owner/app/manifests/1"
QUAY_APP = "/v2/quay.io/org/app/manifests/1"


async def three(make_mirror: MirrorFactory, **settings: str) -> Mirror:
    """A mirror of docker.io, ghcr.io and quay.io, each its own FakeRegistry."""
    return await make_mirror(
        FakeRegistry(),
        registries={GHCR: FakeRegistry(), QUAY: FakeRegistry()},
        **settings,
    )


async def error(resp: aiohttp.ClientResponse) -> dict[str, object]:
    assert resp.content_type == "application/json"
    body = json.loads(await resp.read())
    assert isinstance(body, dict)
    found = body["errors"][0]
    assert isinstance(found, dict)
    return found


def v2_paths(upstream: FakeRegistry) -> list[str]:
    return [
        r.path for r in upstream.log if r.path.startswith("/v2/") and r.kind != "base"
    ]


async def samples(mirror: Mirror) -> dict[str, float]:
    return parse_samples(await (await mirror.client.get("/metrics")).text())


# --- routing --------------------------------------------------------------------------


async def test_ns_routes_to_the_named_registry_and_is_echoed(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"ghcr layer" * 100])

    resp = await mirror.client.get("/v2/owner/app/manifests/1", params={"ns": GHCR})
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert resp.headers["OCI-Namespace"] == GHCR
    layer = image.layers[0]
    resp = await mirror.client.get(f"/v2/owner/app/blobs/{layer}?ns={GHCR}")
    assert await resp.read() == ghcr.blobs[layer]
    assert resp.headers["OCI-Namespace"] == GHCR

    assert v2_paths(ghcr) == [
        "/v2/owner/app/manifests/1",
        f"/v2/owner/app/blobs/{layer}",
    ]
    # ns is the mirror's business: upstream is not told.
    assert all(r.query == "" for r in ghcr.log)
    assert v2_paths(mirror.upstream) == []
    assert v2_paths(mirror.registries[QUAY]) == []


async def test_path_prefix_routes_without_ns(make_mirror: MirrorFactory) -> None:
    mirror = await three(make_mirror)
    quay = mirror.registries[QUAY]
    image = quay.push_image("org/tool", "2", [b"quay layer" * 100])

    resp = await mirror.client.get("/v2/quay.io/org/tool/manifests/2")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert "OCI-Namespace" not in resp.headers  # no ns was given to echo
    resp = await mirror.client.head(f"/v2/quay.io/org/tool/blobs/{image.layers[0]}")
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == len(quay.blobs[image.layers[0]])
    assert v2_paths(quay) == [
        "/v2/org/tool/manifests/2",
        f"/v2/org/tool/blobs/{image.layers[0]}",
    ]
    assert v2_paths(mirror.upstream) == []


async def test_docker_io_as_a_path_prefix_and_its_aliases_as_ns(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    image = mirror.upstream.push_image("library/alpine", "3", [b"alpine" * 100])
    for path, ns in [
        ("/v2/docker.io/alpine/manifests/3", None),
        ("/v2/docker.io/library/alpine/manifests/3", None),
        ("/v2/alpine/manifests/3", "docker.io"),
        ("/v2/library/alpine/manifests/3", "registry-1.docker.io"),
        ("/v2/alpine/manifests/3", "index.docker.io"),
    ]:
        resp = await mirror.client.get(path, params={"ns": ns} if ns else {})
        assert resp.status == 200, path
        assert await resp.read() == image.manifest
        assert resp.headers.get("OCI-Namespace") == ns


async def test_override_path_with_ns_drops_the_repeated_host(
    make_mirror: MirrorFactory,
) -> None:
    """containerd with `server = ".../v2/ghcr.io"` and override_path sends the
    host in the path and in ns."""
    mirror = await three(make_mirror)
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"x" * 100])
    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/manifests/1?ns={GHCR}")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert resp.headers["OCI-Namespace"] == GHCR
    assert v2_paths(ghcr) == ["/v2/owner/app/manifests/1"]


async def test_ns_names_the_registry_even_if_the_path_starts_with_another(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    quay = mirror.registries[QUAY]
    quay.push_image("ghcr.io/owner/app", "1", [b"y" * 100])
    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/manifests/1?ns={QUAY}")
    assert resp.status == 200
    assert v2_paths(quay) == ["/v2/ghcr.io/owner/app/manifests/1"]
    assert v2_paths(mirror.registries[GHCR]) == []


async def test_unknown_ns_is_404_name_unknown_naming_the_host_and_logged_once(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = await three(make_mirror)
    caplog.set_level(logging.WARNING, logger="mirror")
    for _ in range(3):
        resp = await mirror.client.get("/v2/owner/app/manifests/1?ns=gcr.io")
        assert resp.status == 404
        found = await error(resp)
        assert found["code"] == "NAME_UNKNOWN"
        assert "gcr.io" in str(found["message"])
        assert found["detail"] == {
            "ns": "gcr.io",
            "hint": 'the operator can add [registries."gcr.io"] to the mirror\'s '
            "configuration",
        }
        assert "OCI-Namespace" not in resp.headers
    lines = [r.getMessage() for r in caplog.records if "gcr.io" in r.getMessage()]
    assert len(lines) == 1
    assert '[registries."gcr.io"]' in lines[0]
    for upstream in (mirror.upstream, *mirror.registries.values()):
        assert v2_paths(upstream) == []


@pytest.mark.parametrize("ns", ["", "not a host", "x" * 300, "a\x00b", "ünï.io"])
async def test_an_ns_that_is_no_host_name_is_404_without_echoing_it(
    make_mirror: MirrorFactory, ns: str
) -> None:
    mirror = await three(make_mirror)
    resp = await mirror.client.get("/v2/owner/app/manifests/1", params={"ns": ns})
    assert resp.status == 404
    found = await error(resp)
    assert found["code"] == "NAME_UNKNOWN"
    assert found["detail"] == {"ns": None, "hint": "ns must be a registry host name"}
    assert "OCI-Namespace" not in resp.headers


async def test_a_name_that_is_only_a_registry_host_is_name_invalid(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    resp = await mirror.client.get("/v2/ghcr.io/manifests/1")
    assert resp.status == 400
    assert (await error(resp))["code"] == "NAME_INVALID"
    assert v2_paths(mirror.upstream) == []


async def test_library_normalisation_applies_to_docker_io_only(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    quay = mirror.registries[QUAY]
    mirror.upstream.push_image("library/busybox", "1", [b"hub" * 10])
    quay.push_image("busybox", "1", [b"quay" * 10])
    assert (await mirror.client.get("/v2/busybox/manifests/1")).status == 200
    assert (await mirror.client.get("/v2/quay.io/busybox/manifests/1")).status == 200
    assert v2_paths(mirror.upstream) == ["/v2/library/busybox/manifests/1"]
    assert v2_paths(quay) == ["/v2/busybox/manifests/1"]


async def test_a_configured_host_without_a_dot_is_no_path_prefix(
    make_mirror: MirrorFactory,
) -> None:
    """`team/app` is a Docker Hub name even with a registry called `team`."""
    team = FakeRegistry()
    mirror = await make_mirror(FakeRegistry(), registries={"team": team})
    hub = mirror.upstream.push_image("team/app", "1", [b"hub" * 10])
    own = team.push_image("app", "1", [b"team" * 10])
    resp = await mirror.client.get("/v2/team/app/manifests/1")
    assert await resp.read() == hub.manifest
    resp = await mirror.client.get("/v2/app/manifests/1?ns=team")
    assert await resp.read() == own.manifest


# --- tags are per registry, content is shared -----------------------------------------


async def test_the_same_tag_in_two_registries_is_two_tags(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, cache_tag_ttl="1h")
    ghcr, quay = mirror.registries[GHCR], mirror.registries[QUAY]
    on_ghcr = ghcr.push_image("team/app", "1", [b"ghcr" * 100])
    on_quay = quay.push_image("team/app", "1", [b"quay" * 100])
    on_hub = mirror.upstream.push_image("team/app", "1", [b"hub" * 100])
    for _ in range(2):  # the second round is answered from the cache
        for ns, image in [(GHCR, on_ghcr), (QUAY, on_quay), (None, on_hub)]:
            params = {"ns": ns} if ns else {}
            resp = await mirror.client.get("/v2/team/app/manifests/1", params=params)
            assert await resp.read() == image.manifest
            assert resp.headers["Docker-Content-Digest"] == image.digest
    for upstream in (ghcr, quay, mirror.upstream):
        assert upstream.count("manifest") == 1


async def test_a_layer_two_registries_serve_is_fetched_once(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    ghcr, quay = mirror.registries[GHCR], mirror.registries[QUAY]
    shared = b"a base layer both registries carry" * 3000
    on_ghcr = ghcr.push_image("owner/app", "1", [shared, b"ghcr only"])
    on_quay = quay.push_image("org/app", "1", [shared, b"quay only"])
    assert on_ghcr.layers[0] == on_quay.layers[0]
    layer = on_ghcr.layers[0]

    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/blobs/{layer}")
    assert await resp.read() == shared
    await mirror.settle()
    resp = await mirror.client.get(f"/v2/quay.io/org/app/blobs/{layer}")
    assert await resp.read() == shared
    assert resp.headers["X-Mirror-Cache"] == "hit"
    assert ghcr.count("blob") == 1
    assert quay.count("blob") == 0


async def test_a_cached_manifest_digest_is_served_through_any_registry(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"z" * 100])
    path = f"/manifests/{image.digest}"
    assert (await mirror.client.get(f"/v2/ghcr.io/owner/app{path}")).status == 200
    resp = await mirror.client.get(f"/v2/quay.io/other/name{path}")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert v2_paths(mirror.registries[QUAY]) == []


async def test_concurrent_misses_through_two_registries_share_one_download(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    ghcr, quay = mirror.registries[GHCR], mirror.registries[QUAY]
    data = b"shared and big" * 200_000
    layer = ghcr.push_image("owner/app", "1", [data]).layers[0]
    quay.push_image("org/app", "1", [data])

    async def pull(path: str) -> bytes:
        return await (await mirror.client.get(path)).read()

    bodies = await asyncio.gather(
        *(
            pull(f"/v2/{host}/{name}/blobs/{layer}")
            for host, name in [(GHCR, "owner/app"), (QUAY, "org/app")] * 5
        )
    )
    assert all(body == data for body in bodies)
    assert ghcr.count("blob") + quay.count("blob") == 1


# --- state per registry ---------------------------------------------------------------


async def test_one_registry_down_leaves_the_others_working(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, registry_ghcr_io_retries="1")
    ghcr, quay = mirror.registries[GHCR], mirror.registries[QUAY]
    ghcr.push_image("owner/app", "1", [b"g" * 10])
    quay.push_image("org/app", "1", [b"q" * 10])
    mirror.upstream.push_image("library/app", "1", [b"h" * 10])
    ghcr.fail_statuses = [503] * 10

    resp = await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")
    assert resp.status == 503
    # ghcr.io now fails fast (down_backoff) without asking again...
    asked = ghcr.count()
    resp = await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")
    assert resp.status == 503
    assert ghcr.count() == asked
    # ...while the others are asked as usual.
    assert (await mirror.client.get("/v2/quay.io/org/app/manifests/1")).status == 200
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200

    values = await samples(mirror)
    assert values['mirror_upstream_up{registry="ghcr.io"}'] == 0
    assert values['mirror_upstream_up{registry="quay.io"}'] == 1
    assert values['mirror_upstream_up{registry="docker.io"}'] == 1


async def test_a_throttled_registry_does_not_throttle_the_others(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await make_mirror(
        FakeRegistry(ratelimit=10), registries={GHCR: FakeRegistry(ratelimit=0)}
    )
    mirror.registries[GHCR].push_image("owner/app", "1", [b"g" * 10])
    mirror.upstream.push_image("library/app", "1", [b"h" * 10])
    resp = await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")
    assert resp.status == 429
    assert (await error(resp))["code"] == "TOOMANYREQUESTS"
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert mirror.upstream.count("manifest", "GET") == 1

    values = await samples(mirror)
    assert values['mirror_upstream_ratelimit_remaining{registry="ghcr.io"}'] == 0
    assert values['mirror_upstream_ratelimit_remaining{registry="docker.io"}'] == 9
    assert values['mirror_upstream_ratelimit_limit{registry="docker.io"}'] == 100


async def test_ratelimit_gauges_are_absent_for_a_registry_that_sent_no_headers(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await make_mirror(
        FakeRegistry(ratelimit=10), registries={GHCR: FakeRegistry()}
    )
    mirror.registries[GHCR].push_image("owner/app", "1", [b"g" * 10])
    mirror.upstream.push_image("library/app", "1", [b"h" * 10])
    assert (await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")).status == 200
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    values = await samples(mirror)
    assert 'mirror_upstream_ratelimit_remaining{registry="docker.io"}' in values
    assert not [k for k in values if "ratelimit" in k and "ghcr.io" in k]


async def test_docker_hub_credentials_are_not_sent_to_another_registry(
    make_mirror: MirrorFactory,
) -> None:
    hub = FakeRegistry(auth=True, users={"hubuser": "hubsecret"})
    ghcr = FakeRegistry(auth=True)  # anonymous tokens
    mirror = await make_mirror(
        hub,
        registries={GHCR: ghcr},
        upstream_username="hubuser",
        upstream_password="hubsecret",
    )
    hub.push_image("library/app", "1", [b"h" * 10])
    ghcr.push_image("owner/app", "1", [b"g" * 10])
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    assert (await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")).status == 200
    assert hub.token_usernames == ["hubuser"]
    assert ghcr.token_usernames == [None]
    assert not [r for r in ghcr.log if "Basic" in r.headers.get("Authorization", "")]


async def test_each_registry_uses_its_own_credentials(
    make_mirror: MirrorFactory,
) -> None:
    ghcr = FakeRegistry(auth=True, users={"bot": "ghcr-token"})
    mirror = await make_mirror(
        FakeRegistry(),
        registries={GHCR: ghcr},
        registry_ghcr_io_username="bot",
        registry_ghcr_io_password="ghcr-token",
    )
    ghcr.push_image("owner/private", "1", [b"p" * 10])
    resp = await mirror.client.get("/v2/ghcr.io/owner/private/manifests/1")
    assert resp.status == 200
    assert ghcr.token_usernames == ["bot"]


async def test_tag_ttl_is_per_registry(make_mirror: MirrorFactory) -> None:
    mirror = await three(
        make_mirror, cache_tag_ttl="1h", registry_quay_io_tag_ttl="10s"
    )
    quay, ghcr = mirror.registries[QUAY], mirror.registries[GHCR]
    quay.push_image("org/app", "1", [b"q" * 10])
    ghcr.push_image("owner/app", "1", [b"g" * 10])
    for path in (
        "/v2/quay.io/org/app/manifests/1",
        "/v2/ghcr.io/owner/app/manifests/1",
    ):
        assert (await mirror.client.get(path)).status == 200
    mirror.clock.advance(60)
    for path in (
        "/v2/quay.io/org/app/manifests/1",
        "/v2/ghcr.io/owner/app/manifests/1",
    ):
        assert (await mirror.client.get(path)).status == 200
    assert quay.count("manifest", "HEAD") == 1  # revalidated after its 10 s
    assert ghcr.count("manifest", "HEAD") == 0  # [cache]'s hour still runs


async def test_stale_serving_is_per_registry(make_mirror: MirrorFactory) -> None:
    mirror = await three(make_mirror, cache_tag_ttl="10s", registry_ghcr_io_retries="1")
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"g" * 10])
    path = "/v2/ghcr.io/owner/app/manifests/1"
    assert (await mirror.client.get(path)).status == 200
    mirror.clock.advance(60)
    ghcr.fail_statuses = [503] * 5
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert resp.headers["X-Mirror-Stale"] == "1"
    values = await samples(mirror)
    stale = 'mirror_cache_requests_total{kind="tag",registry="ghcr.io",result="stale"}'
    assert values[stale] == 1


# --- policy ---------------------------------------------------------------------------


async def test_a_denied_repository_is_403_denied_without_asking_upstream(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(
        make_mirror,
        registry_quay_io_deny="secret/*",
        registry_ghcr_io_allow="owner/*,team/**",
        upstream_deny="library/ubuntu",
    )
    quay, ghcr = mirror.registries[QUAY], mirror.registries[GHCR]
    quay.push_image("secret/app", "1", [b"s" * 10])
    ghcr.push_image("other/app", "1", [b"o" * 10])
    ghcr.push_image("owner/app", "1", [b"a" * 10])
    ghcr.push_image("team/deep/app", "1", [b"t" * 10])
    mirror.upstream.push_image("library/ubuntu", "1", [b"u" * 10])
    denied = [
        "/v2/quay.io/secret/app/manifests/1",
        "/v2/quay.io/secret/app/blobs/sha256:" + "0" * 64,
        "/v2/quay.io/secret/app/tags/list",
        "/v2/ghcr.io/other/app/manifests/1",
        "/v2/ghcr.io/owner/app/sub/manifests/1",  # * stays in one component
        "/v2/ubuntu/manifests/1",  # docker.io names match in library/ form
        "/v2/library/ubuntu/manifests/1",
    ]
    for path in denied:
        resp = await mirror.client.get(path)
        assert resp.status == 403, path
        found = await error(resp)
        assert found["code"] == "DENIED"
        assert "does not serve" in str(found["message"])
    assert v2_paths(quay) == []
    assert v2_paths(mirror.upstream) == []
    assert v2_paths(ghcr) == []
    values = await samples(mirror)
    assert values['mirror_repository_denials_total{registry="quay.io"}'] == 3
    assert values['mirror_repository_denials_total{registry="ghcr.io"}'] == 2
    assert values['mirror_repository_denials_total{registry="docker.io"}'] == 2
    for path in (
        "/v2/ghcr.io/owner/app/manifests/1",
        "/v2/ghcr.io/team/deep/app/manifests/1",
    ):
        assert (await mirror.client.get(path)).status == 200, path


async def test_a_denied_repository_is_denied_even_when_its_content_is_cached(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, registry_quay_io_deny="blocked/*")
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"c" * 10])
    assert (await mirror.client.get(GHCR_APP)).status == 200
    resp = await mirror.client.get(f"/v2/quay.io/blocked/app/manifests/{image.digest}")
    assert resp.status == 403


# --- tags/list, metrics, readiness ----------------------------------------------------


async def test_tags_list_pages_link_back_the_way_the_client_came(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror)
    ghcr = mirror.registries[GHCR]
    for tag in ("a", "b", "c"):
        ghcr.push_image("owner/app", tag, [tag.encode()])
    resp = await mirror.client.get("/v2/ghcr.io/owner/app/tags/list?n=2")
    assert json.loads(await resp.read())["tags"] == ["a", "b"]
    assert resp.headers["Link"] == (
        '</v2/ghcr.io/owner/app/tags/list?last=b&n=2>; rel="next"'
    )
    assert ghcr.requests("tags")[-1].query == "n=2"
    # Following the link reaches the same registry.
    link = resp.headers["Link"].split(">")[0].lstrip("<")
    resp = await mirror.client.get(link)
    assert json.loads(await resp.read())["tags"] == ["c"]
    assert "Link" not in resp.headers
    assert parse_qs(ghcr.requests("tags")[-1].query) == {"last": ["b"], "n": ["2"]}

    resp = await mirror.client.get(f"/v2/owner/app/tags/list?n=1&ns={GHCR}")
    assert resp.headers["Link"] == (
        '</v2/owner/app/tags/list?last=a&n=1&ns=ghcr.io>; rel="next"'
    )
    assert resp.headers["OCI-Namespace"] == GHCR


async def test_metrics_carry_the_registry_label(make_mirror: MirrorFactory) -> None:
    mirror = await three(make_mirror)
    image = mirror.registries[QUAY].push_image("org/app", "1", [b"m" * 5000])
    assert (await mirror.client.get("/v2/quay.io/org/app/manifests/1")).status == 200
    resp = await mirror.client.get(f"/v2/quay.io/org/app/blobs/{image.layers[0]}")
    assert len(await resp.read()) == 5000
    values = await samples(mirror)
    assert (
        values[
            'mirror_cache_requests_total{kind="blob",registry="quay.io",result="miss"}'
        ]
        == 1
    )
    assert (
        values[
            'mirror_upstream_requests_total{kind="blob",registry="quay.io",result="200"}'
        ]
        == 1
    )
    assert values['mirror_upstream_bytes_total{kind="blob",registry="quay.io"}'] == 5000
    assert not [
        k for k in values if 'registry="docker.io"' in k and "requests_total" in k
    ]


async def test_readyz_reports_each_registry(make_mirror: MirrorFactory) -> None:
    mirror = await three(make_mirror)
    resp = await mirror.client.get("/readyz")
    assert resp.status == 200
    body = json.loads(await resp.read())
    assert set(body["registries"]) == {"docker.io", GHCR, QUAY}
    ghcr = body["registries"][GHCR]
    assert ghcr["ready"] is True
    assert ghcr["identity"] == "anonymous"
    assert ghcr["url"] == mirror.config.registries[0].upstream.url


async def test_readyz_stays_ready_while_only_one_registry_rejects_credentials(
    make_mirror: MirrorFactory,
) -> None:
    ghcr = FakeRegistry(auth=True, users={"bot": "right"})
    mirror = await make_mirror(
        FakeRegistry(),
        registries={GHCR: ghcr},
        registry_ghcr_io_username="bot",
        registry_ghcr_io_password="wrong",
    )
    ghcr.push_image("owner/app", "1", [b"x"])
    resp = await mirror.client.get("/v2/ghcr.io/owner/app/manifests/1")
    assert resp.status == 403
    resp = await mirror.client.get("/readyz")
    assert resp.status == 200
    body = json.loads(await resp.read())
    assert body["registries"][GHCR]["ready"] is False
    assert body["registries"]["docker.io"]["ready"] is True
    assert body["problems"] == ["ghcr.io rejected the configured credentials"]


# --- referrers (OCI 1.1) and the tag schema ---------------------------------------


SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def referrer_digests(body: bytes) -> list[str]:
    index = json.loads(body)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    return [m["digest"] for m in index["manifests"]]


async def test_referrers_are_relayed_and_cached_for_the_tag_ttl(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, registry_ghcr_io_tag_ttl="1m")
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"r" * 100])
    signature = ghcr.push_referrer("owner/app", image, SIGNATURE)
    path = f"/v2/ghcr.io/owner/app/referrers/{image.digest}"

    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert resp.content_type == "application/vnd.oci.image.index.v1+json"
    assert "X-Mirror-Stale" not in resp.headers
    assert referrer_digests(await resp.read()) == [signature]
    assert v2_paths(ghcr) == [f"/v2/owner/app/referrers/{image.digest}"]

    sbom = ghcr.push_referrer("owner/app", image, SBOM, b"sbom")
    mirror.clock.advance(59)
    resp = await mirror.client.get(path)
    assert referrer_digests(await resp.read()) == [signature]  # cached
    assert "X-Mirror-Stale" not in resp.headers
    assert ghcr.count("other") == 1
    mirror.clock.advance(1)  # exactly the TTL: asked again
    resp = await mirror.client.get(path)
    assert sorted(referrer_digests(await resp.read())) == sorted([signature, sbom])
    assert ghcr.count("other") == 2
    values = await samples(mirror)
    labels = 'kind="referrers",registry="ghcr.io"'
    assert values[f'mirror_cache_requests_total{{{labels},result="hit"}}'] == 1
    assert values[f'mirror_cache_requests_total{{{labels},result="miss"}}'] == 2


async def test_a_paginated_referrers_query_is_relayed_not_cached(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, registry_ghcr_io_tag_ttl="1h")
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"p" * 100])
    signature = ghcr.push_referrer("owner/app", image, SIGNATURE)
    path = f"/v2/ghcr.io/owner/app/referrers/{image.digest}"
    for _ in range(2):
        resp = await mirror.client.get(path, params={"n": "1", "last": "x"})
        assert resp.status == 200
        assert resp.content_type == "application/vnd.oci.image.index.v1+json"
        assert referrer_digests(await resp.read()) == [signature]
    asked = ghcr.requests("other")
    assert [r.path for r in asked] == [f"/v2/owner/app/referrers/{image.digest}"] * 2
    assert [parse_qs(r.query) for r in asked] == [{"n": ["1"], "last": ["x"]}] * 2
    values = await samples(mirror)
    labels = 'kind="referrers",registry="ghcr.io"'
    assert values[f'mirror_cache_requests_total{{{labels},result="miss"}}'] == 2

    ghcr.referrers_api = False  # a registry without the API: its 404 passes
    resp = await mirror.client.get(path, params={"n": "1"})
    assert resp.status == 404
    assert (await error(resp))["code"] == "NOT_FOUND"


async def test_referrers_filtered_by_artifact_type_are_cached_apart(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, registry_ghcr_io_tag_ttl="1h")
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"f" * 100])
    signature = ghcr.push_referrer("owner/app", image, SIGNATURE)
    ghcr.push_referrer("owner/app", image, SBOM, b"sbom")
    path = f"/v2/owner/app/referrers/{image.digest}"
    for _ in range(2):
        resp = await mirror.client.get(
            path, params={"ns": GHCR, "artifactType": SIGNATURE}
        )
        assert resp.status == 200
        assert referrer_digests(await resp.read()) == [signature]
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
        assert resp.headers["OCI-Namespace"] == GHCR
        resp = await mirror.client.get(path, params={"ns": GHCR})
        assert len(referrer_digests(await resp.read())) == 2
        assert "OCI-Filters-Applied" not in resp.headers
    asked = ghcr.requests("other")
    assert [parse_qs(r.query) for r in asked] == [{"artifactType": [SIGNATURE]}, {}]


async def test_without_a_referrers_api_the_404_passes_and_the_tag_schema_works(
    make_mirror: MirrorFactory,
) -> None:
    """cosign against a registry without the API: referrers 404, then the
    `sha256-<hex>.sig` tag, which moves like any tag."""
    ghcr = FakeRegistry(referrers_api=False)
    mirror = await make_mirror(
        FakeRegistry(), registries={GHCR: ghcr}, registry_ghcr_io_tag_ttl="1m"
    )
    image = ghcr.push_image("owner/app", "1", [b"t" * 100])
    path = f"/v2/ghcr.io/owner/app/referrers/{image.digest}"
    for _ in range(2):
        resp = await mirror.client.get(path)
        assert resp.status == 404
        assert (await error(resp))["code"] == "NOT_FOUND"
    assert ghcr.count("other") == 1  # the 404 is cached for the TTL too

    tag = "sha256-" + image.digest.removeprefix("sha256:") + ".sig"
    first = ghcr.push_referrer("owner/app", image, SIGNATURE, b"sig 1", tag=tag)
    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/manifests/{tag}")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == first
    second = ghcr.push_referrer("owner/app", image, SIGNATURE, b"sig 2", tag=tag)
    mirror.clock.advance(61)
    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/manifests/{tag}")
    assert resp.headers["Docker-Content-Digest"] == second


async def test_referrers_are_served_stale_within_max_stale_when_upstream_fails(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(
        make_mirror,
        registry_ghcr_io_tag_ttl="1m",
        registry_ghcr_io_max_stale="1h",
        registry_ghcr_io_retries="1",
        registry_ghcr_io_down_backoff="0s",
    )
    ghcr = mirror.registries[GHCR]
    image = ghcr.push_image("owner/app", "1", [b"s" * 100])
    signature = ghcr.push_referrer("owner/app", image, SIGNATURE)
    path = f"/v2/ghcr.io/owner/app/referrers/{image.digest}"
    assert (await mirror.client.get(path)).status == 200

    ghcr.fail_statuses = [503] * 10
    mirror.clock.advance(120)
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert resp.headers["X-Mirror-Stale"] == "1"
    assert referrer_digests(await resp.read()) == [signature]
    values = await samples(mirror)
    labels = 'kind="referrers",registry="ghcr.io"'
    assert values[f'mirror_cache_requests_total{{{labels},result="stale"}}'] == 1
    mirror.clock.advance(3600)
    resp = await mirror.client.get(path)
    assert resp.status == 503
    assert (await error(resp))["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 32, "latest"])
async def test_referrers_of_a_bad_digest_are_400_without_asking_upstream(
    make_mirror: MirrorFactory, digest: str
) -> None:
    mirror = await three(make_mirror)
    resp = await mirror.client.get(f"/v2/ghcr.io/owner/app/referrers/{digest}")
    assert resp.status == 400
    assert (await error(resp))["code"] == "DIGEST_INVALID"
    assert v2_paths(mirror.registries[GHCR]) == []


# --- reload ------------------------------------------------------------------------


async def test_sighup_applies_registry_ttls_and_names_what_needs_a_restart(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await three(make_mirror, cache_tag_ttl="1h")
    app = mirror.client.app
    ghcr = mirror.registries[GHCR]
    ghcr.push_image("owner/app", "1", [b"h" * 10])
    assert (await mirror.client.get(GHCR_APP)).status == 200

    (quay_config,) = [r for r in mirror.config.registries if r.host == QUAY]
    changed = dataclasses.replace(
        mirror.config,
        registries=(
            dataclasses.replace(
                mirror.config.registries[0],
                tag_ttl=5.0,
                upstream=dataclasses.replace(
                    mirror.config.registries[0].upstream,
                    url="https://elsewhere.example",
                ),
            ),
            dataclasses.replace(quay_config, host="gcr.io"),
        ),
    )
    restart = app[RELOAD](changed)
    assert restart == [
        'registries."gcr.io"',
        'registries."quay.io"',
        'registries."ghcr.io".url',
    ]
    mirror.clock.advance(10)
    assert (await mirror.client.get(GHCR_APP)).status == 200
    assert ghcr.count("manifest", "HEAD") == 1  # the new 5 s TTL applies


# --- a registry that redirects everything (registry.k8s.io) ------------------------


async def test_a_registry_redirecting_to_another_that_authenticates_is_followed(
    make_mirror: MirrorFactory, aiohttp_server: ServerFactory
) -> None:
    """registry.k8s.io answers every /v2/ request with a 307 to a regional
    Artifact Registry, which wants a token of its own and names the
    repository its own way."""
    regional = FakeRegistry(auth=True)
    image = regional.push_image("k8s-artifacts-prod/images/pause", "3.9", [b"p" * 999])
    server = await aiohttp_server(regional.app())
    front = FakeRegistry(
        redirect_to=str(server.make_url("")).rstrip("/"),
        redirect_prefix="k8s-artifacts-prod/images/",
    )
    mirror = await make_mirror(
        FakeRegistry(), registries={"registry.k8s.io": front}, cache_tag_ttl="10s"
    )
    path = "/v2/registry.k8s.io/pause"
    resp = await mirror.client.get(f"{path}/manifests/3.9")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    for digest in image.blobs:
        resp = await mirror.client.get(f"{path}/blobs/{digest}")
        assert await resp.read() == regional.blobs[digest]
    mirror.clock.advance(60)  # revalidated with a HEAD, through the redirect
    resp = await mirror.client.get(f"{path}/manifests/3.9")
    assert resp.status == 200
    assert regional.count("manifest", "HEAD") == 1

    assert {r.path.split("/")[2] for r in front.log} == {"pause"}
    assert all(
        r.path.startswith("/v2/k8s-artifacts-prod/images/pause/")
        for r in regional.log
        if r.path != "/token"
    )
    # Its token was fetched from, and sent to, the regional registry only.
    assert regional.tokens_issued == 1
    assert not [r for r in front.log if "Authorization" in r.headers]


async def test_a_redirect_from_https_down_to_http_is_refused(
    make_mirror: MirrorFactory, aiohttp_server: ServerFactory, tls_files: TlsFiles
) -> None:
    plain = FakeRegistry()
    plain.push_image("library/app", "1", [b"d" * 10])
    server = await aiohttp_server(plain.app())
    front = FakeRegistry(redirect_to=str(server.make_url("")).rstrip("/"))
    mirror = await make_mirror(
        front,
        server_ssl=tls_files.server_context(),
        upstream_ca_file=str(tls_files.ca_file),
    )
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503
    assert plain.log == []


@pytest.mark.parametrize(
    "path",
    [
        "/v2/gcr.io/distroless/static/manifests/1",
        "/v2/registry.corp:5000/team/app/blobs/sha256:" + "0" * 64,
        "/v2/localhost/app/tags/list",
    ],
)
async def test_an_unconfigured_host_prefix_is_name_unknown_without_asking_docker_hub(
    make_mirror: MirrorFactory, path: str
) -> None:
    mirror = await three(make_mirror)
    resp = await mirror.client.get(path)
    assert resp.status == 404
    found = await error(resp)
    assert found["code"] == "NAME_UNKNOWN"
    assert "is not mirrored here" in str(found["message"])
    for upstream in (mirror.upstream, *mirror.registries.values()):
        assert v2_paths(upstream) == []
