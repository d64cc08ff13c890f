"""Upstream behaviour: auth, rate limits, retries, fail-fast, resumable blobs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry, sha256

ServerFactory = Callable[..., Awaitable[TestServer]]


def blob_data(n: int, size: int = 600_000) -> bytes:
    return sha256(str(n).encode()).encode() * (size // 71)


async def metric(mirror: Mirror, line_start: str) -> float:
    text = await (await mirror.client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


async def oci_code(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


# --- rate limit ---------------------------------------------------------------


async def test_ratelimit_gauges_follow_upstream_headers(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(ratelimit=50)
    upstream.push_image("library/app", "1", [b"a" * 100])
    mirror = await make_mirror(upstream)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    assert (
        await metric(mirror, 'mirror_upstream_ratelimit_limit{registry="docker.io"}')
        == 100
    )
    assert (
        await metric(
            mirror, 'mirror_upstream_ratelimit_remaining{registry="docker.io"}'
        )
        == 49
    )


async def test_many_clients_many_pulls_spend_one_counted_get_per_manifest(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(ratelimit=100)
    upstream.push_image("library/app", "1", [b"b" * 100])
    mirror = await make_mirror(upstream, cache_tag_ttl="1m")

    async def pull() -> None:
        resp = await mirror.client.get("/v2/library/app/manifests/1")
        assert resp.status == 200

    for _round in range(5):  # M pulls by N clients, across TTL expiries
        await asyncio.gather(*(pull() for _ in range(10)))
        mirror.clock.advance(61)
    assert upstream.count("manifest", "GET") == 1
    assert upstream.ratelimit == 99


async def test_rate_limited_upstream_gives_429_for_uncached_and_cache_for_cached(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(ratelimit=1)
    upstream.push_image("library/cached", "1", [b"c" * 100])
    upstream.push_image("library/new", "1", [b"d" * 100])
    mirror = await make_mirror(upstream, cache_tag_ttl="1m")
    cached = await mirror.client.get("/v2/library/cached/manifests/1")
    body = await cached.read()

    resp = await mirror.client.get("/v2/library/new/manifests/1")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "30"
    assert await oci_code(resp) == "TOOMANYREQUESTS"
    # Throttled: the next uncached pull does not even ask upstream.
    gets = upstream.count("manifest", "GET")
    resp = await mirror.client.get("/v2/library/new/manifests/1")
    assert resp.status == 429
    assert upstream.count("manifest", "GET") == gets

    mirror.clock.advance(61)  # the cached tag expires: a free HEAD revalidates
    resp = await mirror.client.get("/v2/library/cached/manifests/1")
    assert resp.status == 200
    assert await resp.read() == body
    assert upstream.count("manifest", "GET") == gets
    assert (
        await metric(
            mirror, 'mirror_upstream_ratelimit_remaining{registry="docker.io"}'
        )
        == 0
    )


async def test_throttle_ends_after_retry_after(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry(ratelimit=0)
    image = upstream.push_image("library/app", "1", [b"e" * 100])
    mirror = await make_mirror(upstream)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 429
    upstream.ratelimit = 10
    mirror.clock.advance(31)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest


# --- authentication -----------------------------------------------------------


async def test_configured_credentials_are_used_for_tokens(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True, users={"ci-bot": "s3cret"})
    image = upstream.push_image("someuser/private", "1", [b"f" * 100])
    mirror = await make_mirror(
        upstream, upstream_username="ci-bot", upstream_password="s3cret"
    )
    resp = await mirror.client.get("/v2/someuser/private/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert upstream.token_usernames == ["ci-bot"]
    ready = await mirror.client.get("/readyz")
    assert ready.status == 200


async def test_rejected_credentials_are_loud_and_not_downgraded(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = FakeRegistry(auth=True, users={"ci-bot": "s3cret"})
    upstream.push_image("library/app", "1", [b"g" * 100])
    mirror = await make_mirror(
        upstream, upstream_username="ci-bot", upstream_password="wrong"
    )
    with caplog.at_level(logging.ERROR, logger="mirror"):
        resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 403
    assert await oci_code(resp) == "DENIED"
    assert "rejected the configured credentials" in caplog.text
    assert "ci-bot" not in caplog.text  # no account name in logs
    assert upstream.token_usernames == []  # never fell back to anonymous
    assert all(
        r.headers.get("Authorization", "").startswith("Basic ")
        for r in upstream.requests("token")
    )
    failures = (
        'mirror_upstream_auth_failures_total{reason="rejected",registry="docker.io"}'
    )
    assert await metric(mirror, failures) == 1
    ready = await mirror.client.get("/readyz")
    assert ready.status == 503
    assert "rejected the configured credentials" in json.dumps(await ready.json())
    # Not asked again for a while: refused credentials stay refused...
    token_requests = upstream.count("token")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 403
    assert upstream.count("token") == token_requests
    # ...then tried again, and fixed credentials make the mirror ready.
    upstream.users = {"ci-bot": "wrong"}
    mirror.clock.advance(31)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert (await mirror.client.get("/readyz")).status == 200


async def test_invalid_token_is_replaced_once(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry(auth=True)
    image = upstream.push_image("library/app", "1", [b"h" * 100])
    mirror = await make_mirror(upstream)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    upstream.revoke_tokens()
    resp = await mirror.client.get(f"/v2/library/app/blobs/{image.layers[0]}")
    assert resp.status == 200
    assert await resp.read() == b"h" * 100
    assert upstream.tokens_issued == 2


async def test_credentials_never_go_to_a_realm_on_another_host(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True, users={"ci-bot": "s3cret"})
    upstream.push_image("library/app", "1", [b"i" * 100])
    upstream.realm_host = "evil.example"
    mirror = await make_mirror(
        upstream, upstream_username="ci-bot", upstream_password="s3cret"
    )
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 403
    assert upstream.count("token") == 0
    labels = 'reason="untrusted_realm",registry="docker.io"'
    untrusted = f"mirror_upstream_auth_failures_total{{{labels}}}"
    assert await metric(mirror, untrusted) == 1


# --- failures, retries, fail-fast ---------------------------------------------


async def test_transient_5xx_is_retried_invisibly(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"j" * 100])
    upstream.fail_statuses = [502, 503]
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert upstream.count("manifest", "GET") == 3


async def test_upstream_down_fails_fast_then_recovers(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"k" * 100])
    upstream.fail_statuses = [503] * 3
    mirror = await make_mirror(upstream, upstream_down_backoff="10s")
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 503
    seen = len(upstream.log)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503
    assert len(upstream.log) == seen  # failed fast, upstream not asked
    assert await metric(mirror, 'mirror_upstream_up{registry="docker.io"}') == 0
    mirror.clock.advance(11)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert await metric(mirror, 'mirror_upstream_up{registry="docker.io"}') == 1


async def test_stale_tag_served_only_within_max_stale(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"l" * 100])
    mirror = await make_mirror(
        upstream,
        cache_tag_ttl="1m",
        cache_max_stale="1h",
        upstream_down_backoff="0s",
    )
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    upstream.fail_statuses = [503] * 100
    mirror.clock.advance(30 * 60)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert resp.headers["X-Mirror-Stale"] == "1"
    mirror.clock.advance(31 * 60)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503


async def test_stalled_upstream_times_out_to_503(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"m" * 100])
    upstream.stall = asyncio.Event()
    mirror = await make_mirror(
        upstream, upstream_first_byte_timeout="100ms", upstream_retries="1"
    )
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 503
    upstream.stall.set()


# --- resumable blob downloads ---------------------------------------------------


async def test_cut_blob_is_resumed_with_range(make_mirror: MirrorFactory) -> None:
    upstream = FakeRegistry()
    data = blob_data(1)
    digest = upstream.add_blob(data)
    upstream.truncate_once[digest] = 200_000
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    gets = upstream.requests("blob", "GET")
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    assert gets[1].headers["Range"].startswith("bytes=")
    assert int(gets[1].headers["Range"][6:-1]) > 0
    assert await metric(mirror, 'mirror_blob_resumes_total{registry="docker.io"}') == 1
    await mirror.settle()
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.headers["X-Mirror-Cache"] == "hit"


async def test_resume_against_upstream_ignoring_range_restarts_cleanly(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(honour_range=False)
    data = blob_data(2)
    digest = upstream.add_blob(data)
    upstream.truncate_once[digest] = 200_000
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await resp.read() == data
    assert upstream.count("blob", "GET") == 2


async def test_a_resume_that_brings_nothing_is_not_repeated(
    make_mirror: MirrorFactory,
) -> None:
    """Every attempt is cut at byte 200 000: a resume from there brings
    nothing, so there is no further resume (a stalled or broken upstream would
    otherwise hold a download slot for every attempt). Resumes that do bring
    bytes are bounded by resume_attempts: see test_network.py."""
    upstream = FakeRegistry()
    data = blob_data(3)
    digest = upstream.add_blob(data)
    upstream.truncate[digest] = 200_000
    upstream.gate = asyncio.Event()
    mirror = await make_mirror(upstream, upstream_resume_attempts="5")
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert resp.status == 200
    await resp.content.readany()
    upstream.gate.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    # The first try; a resume from where the mirror's buffers stopped, which
    # may still bring the bytes up to the cut (aiohttp drops what it had
    # buffered when the connection breaks); then one that brings nothing.
    # Not the five resumes allowed.
    assert 2 <= upstream.count("blob", "GET") <= 3
    await mirror.settle()
    assert not any(mirror.config.cache.dir.glob("blobs/sha256/*/*"))


# --- the CDN redirect and Basic auth --------------------------------------------


async def test_blob_redirect_to_cdn_is_followed_without_credentials(
    make_mirror: MirrorFactory, aiohttp_server: ServerFactory
) -> None:
    upstream = FakeRegistry(auth=True)
    image = upstream.push_image("library/app", "1", [blob_data(4)])
    cdn = await aiohttp_server(upstream.cdn_app())
    upstream.cdn_url = str(cdn.make_url("")).rstrip("/")
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/app/blobs/{image.layers[0]}")
    assert resp.status == 200
    assert sha256(await resp.read()) == image.layers[0]
    assert len(upstream.cdn_log) == 1
    assert "Authorization" not in upstream.cdn_log[0].headers
    # The registry itself did get the token.
    blob_get = upstream.requests("blob", "GET")[-1]
    assert blob_get.headers["Authorization"].startswith("Bearer ")


async def test_basic_challenge_is_answered_with_the_credentials(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True, scheme="basic", users={"u": "p"})
    image = upstream.push_image("library/app", "1", [b"n" * 100])
    mirror = await make_mirror(upstream, upstream_username="u", upstream_password="p")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    resp = await mirror.client.get(f"/v2/library/app/blobs/{image.layers[0]}")
    assert resp.status == 200
    # One 401 taught the scheme; later requests carried Basic up front.
    assert (
        upstream.count() - sum(1 for r in upstream.log if "Authorization" in r.headers)
        == 1
    )


async def test_no_secret_in_logs_metrics_readyz_or_error_bodies(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The account name, its password and the tokens issued for it appear
    nowhere a client or a log reader can see, whether pulls work or not."""
    upstream = FakeRegistry(auth=True, users={"ci-bot-7f3a": "pw-9c1e-secret"})
    image = upstream.push_image("library/app", "1", [b"q" * 100])
    mirror = await make_mirror(
        upstream,
        upstream_username="ci-bot-7f3a",
        upstream_password="pw-9c1e-secret",
    )
    seen: list[bytes] = []
    with caplog.at_level(logging.DEBUG):
        for path in (
            "/v2/library/app/manifests/1",
            *(f"/v2/library/app/blobs/{d}" for d in image.blobs),
            "/v2/library/nothing/manifests/1",  # an error body
            "/v2/library/app/tags/list",
        ):
            seen.append(await (await mirror.client.get(path)).read())
        upstream.revoke_tokens()
        upstream.users = {"ci-bot-7f3a": "changed"}  # now rejected
        mirror.clock.advance(3600)
        resp = await mirror.client.get("/v2/library/app/manifests/1?x=1")
        seen.append(await resp.read())
        resp = await mirror.client.get("/v2/library/other/manifests/1")
        assert resp.status == 403
        seen.append(await resp.read())
        seen.append(await (await mirror.client.get("/readyz")).read())
        seen.append(await (await mirror.client.get("/metrics")).read())
    assert upstream.tokens_issued >= 1
    secrets = [
        "ci-bot-7f3a",
        "pw-9c1e-secret",
        *(f"token-{n}" for n in range(1, upstream.tokens_issued + 1)),
    ]
    visible = caplog.text + b"".join(seen).decode(errors="replace")
    for secret in secrets:
        assert secret not in visible, secret
