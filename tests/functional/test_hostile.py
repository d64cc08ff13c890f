"""A hostile upstream: malformed, huge, lying or racing answers.

Every answer the mirror gives must be a correct 200 or an OCI error envelope
with the right status; no traceback may reach the log; and nothing corrupt
may be cached (checked from disk and SQLite by tests/cache_check.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.upstream.client import MAX_REDIRECTS
from tests import cache_check
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.hostile import (
    HostileRegistry,
    Rewrite,
    Stream,
    gzipped,
    html_error,
    redirect,
)
from tests.fakes.registry import OCI_MANIFEST, FakeRegistry, Image, sha256
from tests.promtext import parse_samples

ServerFactory = Callable[..., Awaitable[TestServer]]
MiB = 1024 * 1024
# What may reach the fake beyond what the mirror reads: loopback socket
# buffers (tcp_rmem allows the receiver up to 32 MiB) and aiohttp's own.
WIRE_SLACK = 32 * MiB
# Docker Hub's rate-limit window: no Retry-After should exceed it.
HUB_WINDOW = 21600
NESTED = b'{"a":' * 1000 + b"1" + b"}" * 1000
MANIFESTS = frozenset({"manifest"})
BLOBS = frozenset({"blob"})
TAGS = frozenset({"tags"})
TOKENS = frozenset({"token"})


def layer(n: int, size: int = 50_000) -> bytes:
    return sha256(str(n).encode()).encode() * (size // 71)


def hostile(**knobs: Any) -> tuple[HostileRegistry, Image]:
    upstream = HostileRegistry(**knobs)
    image = upstream.push_image("library/app", "1", [layer(1), layer(2)])
    return upstream, image


async def envelope(resp: aiohttp.ClientResponse, status: int, *codes: str) -> None:
    """`resp` is the OCI error envelope with `status` and one of `codes`."""
    body = await resp.read()
    assert resp.status == status, (resp.status, body[:300])
    assert resp.content_type == "application/json", (resp.content_type, body[:300])
    if resp.method == "HEAD":
        return  # the headers of the envelope, without its body
    errors = json.loads(body)["errors"]
    assert errors[0]["code"] in codes, errors


async def oci_error(resp: aiohttp.ClientResponse, *allowed: tuple[int, str]) -> None:
    """One of the (status, code) pairs, as an OCI envelope."""
    statuses = {status for status, _ in allowed}
    assert resp.status in statuses, (resp.status, (await resp.read())[:300])
    await envelope(resp, resp.status, *(c for s, c in allowed if s == resp.status))


async def assert_sound(mirror: Mirror, caplog: pytest.LogCaptureFixture) -> None:
    """No traceback logged, and nothing wrong in the cache."""
    await mirror.settle()
    tracebacks = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info and r.levelno >= logging.ERROR
    ]
    assert tracebacks == []
    assert cache_check.problems(mirror.config.cache.dir) == []


def stored(mirror: Mirror) -> cache_check.Cached:
    return cache_check.cached(mirror.config.cache.dir)


async def samples(mirror: Mirror) -> dict[str, float]:
    """Every sample on /metrics: `name{labels}` -> value."""
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    return parse_samples(await resp.text())


async def outcome(resp: aiohttp.ClientResponse, data: bytes) -> str:
    """How a blob GET ended: "exact" (200, every byte right), "cut" (the
    connection cut short of the length), or "refused" (an OCI error)."""
    if resp.status != 200:
        await oci_error(resp, (503, "UNAVAILABLE"))
        return "refused"
    try:
        body = await resp.read()
    except aiohttp.ClientPayloadError:
        return "cut"
    assert body == data, "a complete 200 with wrong bytes"
    return "exact"


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until `check()` is true; fail after 5 s."""
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("still not true after 5 s")


# --- manifest Content-Type ------------------------------------------------------

BAD_CONTENT_TYPES = {
    "control-char": OCI_MANIFEST.encode() + b"\x01x",
    "delete-char": b"application/vnd.oci\x7f.image.manifest.v1+json",
    "non-utf8": b"application/vnd.oci.image.\xff\xfe.v1+json",
    "latin1": "application/vnd.oci.image.manifest.v1+jsön".encode("latin-1"),
    "no-subtype": b"application",
    "two-slashes": OCI_MANIFEST.encode() + b"/x",
    "space-inside": b"application/vnd oci+json",
}
MANIFEST_REQUESTS = ["GET tag", "GET digest", "HEAD tag", "HEAD digest"]


def manifest_path(image: Image, request: str) -> tuple[str, str]:
    method, by = request.split()
    reference = image.tag if by == "tag" else image.digest
    return method, f"/v2/{image.repository}/manifests/{reference}"


@pytest.mark.parametrize("request_", MANIFEST_REQUESTS)
@pytest.mark.parametrize(
    "content_type", BAD_CONTENT_TYPES.values(), ids=list(BAD_CONTENT_TYPES)
)
async def test_bad_manifest_content_type_is_503_and_not_cached(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    content_type: bytes,
    request_: str,
) -> None:
    upstream, image = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS, headers={"Content-Type": content_type}
    )
    mirror = await make_mirror(upstream, upstream_down_backoff="0s")
    method, path = manifest_path(image, request_)

    await envelope(await mirror.client.request(method, path), 503, "UNAVAILABLE")
    assert stored(mirror).empty

    upstream.misbehave = None  # upstream is fixed: the mirror asks again
    asked = upstream.count("manifest")
    resp = await mirror.client.request(method, path)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert await resp.read() == (image.manifest if method == "GET" else b"")
    assert upstream.count("manifest") > asked
    await assert_sound(mirror, caplog)


# --- rate-limit headers -----------------------------------------------------------

ABSURD_RATELIMITS = {
    "400-digits": (b"9" * 400, b"9" * 400),
    "5000-digits": (b"9" * 5000, b"8" * 5000),
    "negative": (b"-5", b"-5;w=-21600"),
    "garbage": (b"abc", b"x;w=y"),
    "huge-window": (b"100;w=" + b"9" * 400, b"50;w=" + b"9" * 400),
    "float-words": (b"1e308", b"inf;w=nan"),
}


@pytest.mark.parametrize(
    ("limit", "remaining"), ABSURD_RATELIMITS.values(), ids=list(ABSURD_RATELIMITS)
)
async def test_absurd_ratelimit_headers_leave_pulls_and_metrics_working(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    limit: bytes,
    remaining: bytes,
) -> None:
    upstream, image = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS,
        headers={"ratelimit-limit": limit, "ratelimit-remaining": remaining},
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    head = await mirror.client.head(f"/v2/library/app/manifests/{image.digest}")
    assert head.status == 200

    values = await samples(mirror)
    assert all(math.isfinite(v) for v in values.values())
    # Absent until a header makes sense (an absurd one never does), and
    # never an absurd value.
    gauges = {k: v for k, v in values.items() if k.startswith("mirror_upstream_rate")}
    assert all(0 <= v <= 1e9 for v in gauges.values()), gauges
    await assert_sound(mirror, caplog)


async def test_429_after_an_absurd_window_has_a_bounded_retry_after(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, _ = hostile(ratelimit=1, retry_after=None)
    upstream.push_image("library/new", "1", [layer(3)])
    window = b";w=" + b"9" * 400
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS,
        headers={
            "ratelimit-limit": b"1" + window,
            "ratelimit-remaining": b"0" + window,
        },
    )
    mirror = await make_mirror(upstream)
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    # The budget is spent; the 429 says no Retry-After, only the absurd window.
    resp = await mirror.client.get("/v2/library/new/manifests/1")
    await envelope(resp, 429, "TOOMANYREQUESTS")
    assert 0 <= int(resp.headers["Retry-After"]) <= HUB_WINDOW
    await assert_sound(mirror, caplog)


# --- 429 Retry-After ----------------------------------------------------------------

ABSURD_RETRY_AFTER = {
    "1e308": "1e308",
    "400-digits": "9" * 400,
    "negative": "-5",
    "nan": "nan",
    "inf": "inf",
    "hex": "0x10",
    "past-http-date": "Wed, 21 Oct 2015 07:28:00 GMT",
    "far-http-date": "Fri, 31 Dec 9999 23:59:59 GMT",
    "week": str(7 * 86400),
}


@pytest.mark.parametrize(
    "retry_after", ABSURD_RETRY_AFTER.values(), ids=list(ABSURD_RETRY_AFTER)
)
async def test_429_retry_after_is_finite_and_at_most_the_window(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, retry_after: str
) -> None:
    upstream, image = hostile(ratelimit=0, retry_after=retry_after)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    await envelope(resp, 429, "TOOMANYREQUESTS")
    assert re.fullmatch(r"\d{1,5}", resp.headers["Retry-After"])
    assert int(resp.headers["Retry-After"]) <= HUB_WINDOW
    gets = upstream.count("manifest", "GET")

    upstream.ratelimit = 10
    mirror.clock.advance(HUB_WINDOW + 1)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert upstream.count("manifest", "GET") == gets + 1
    await assert_sound(mirror, caplog)


# --- deeply nested JSON -------------------------------------------------------------


async def test_deeply_nested_manifest_is_served_verbatim(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = FakeRegistry()
    digest = upstream.add_manifest("library/deep", NESTED, OCI_MANIFEST, "1")
    mirror = await make_mirror(upstream)
    for reference in ("1", digest, digest):
        resp = await mirror.client.get(f"/v2/library/deep/manifests/{reference}")
        assert resp.status == 200
        assert await resp.read() == NESTED
        assert resp.headers["Docker-Content-Digest"] == digest
    assert upstream.count("manifest", "GET") == 1  # then served from cache
    assert set(stored(mirror).manifests) == {digest}
    await assert_sound(mirror, caplog)


# --- the token endpoint -------------------------------------------------------------


async def test_deeply_nested_token_answer_is_503(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, _ = hostile(auth=True)
    upstream.misbehave = Rewrite(kinds=TOKENS, body=lambda _body: NESTED)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    await envelope(resp, 503, "UNAVAILABLE")
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_100mb_token_answer_is_refused_without_reading_it(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, length: bool
) -> None:
    upstream, _ = hostile(auth=True)
    upstream.misbehave = Stream(
        kinds=TOKENS, size=100 * 1000 * 1000, length=length, content_type="text/json"
    )
    mirror = await make_mirror(upstream, upstream_retries="1")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    await envelope(resp, 503, "UNAVAILABLE")
    assert upstream.count("token") == 1
    assert upstream.sent["token"] <= WIRE_SLACK
    await assert_sound(mirror, caplog)


ABSURD_EXPIRES_IN = {
    "1e308": b"1e308",
    "overflows-to-inf": b"1e400",
    "negative": b"-5",
    "string": b'"abc"',
    "400-digits": b"9" * 400,
    "nan": b"NaN",
    "minus-infinity": b"-Infinity",
    "bool": b"true",
    "list": b"[300]",
}


@pytest.mark.parametrize(
    "expires_in", ABSURD_EXPIRES_IN.values(), ids=list(ABSURD_EXPIRES_IN)
)
async def test_absurd_token_expires_in_still_pulls(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, expires_in: bytes
) -> None:
    upstream, image = hostile(auth=True)
    upstream.misbehave = Rewrite(
        kinds=TOKENS,
        body=lambda body: re.sub(
            rb'"expires_in": \d+', b'"expires_in": ' + expires_in, body
        ),
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    for n, digest in enumerate(image.layers):
        mirror.clock.advance(3600 * n)  # the second blob needs a token later
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
        assert sha256(await resp.read()) == digest
    assert upstream.tokens_issued >= 1
    await assert_sound(mirror, caplog)


# --- hostile challenges and realms ----------------------------------------------------

HOSTILE_CHALLENGES = {
    "unparseable-ipv6-realm": b'Bearer realm="http://[::1",service="fake"',
    "bad-port-realm": b'Bearer realm="http://127.0.0.1:99999/token"',
    "ftp-realm": b'Bearer realm="ftp://127.0.0.1/token",service="fake"',
    "file-realm": b'Bearer realm="file:///etc/passwd"',
    "javascript-realm": b'Bearer realm="javascript:alert(1)"',
    "empty-realm": b'Bearer realm="",service="fake"',
    "no-realm": b'Bearer service="fake"',
    "scheme-relative-realm": b'Bearer realm="//{host}/token"',
    "path-only-realm": b'Bearer realm="/token"',
    "refused-realm": b'Bearer realm="http://127.0.0.1:1/token"',
    "bare-bearer": b"Bearer",
    "unclosed-quote": b'Bearer realm="http://{host}/token',
    "control-chars": b"\x01\x02\x03",
    "non-utf8-realm": b'Bearer realm="http://{host}/t\xff\xfe"',
    "unknown-scheme": b"Negotiate abc",
    "basic-without-credentials": b'Basic realm="x"',
    "many-params": b"Bearer " + b"a=b," * 1500,
}


@pytest.mark.parametrize("credentials", [False, True], ids=["anonymous", "account"])
@pytest.mark.parametrize(
    "challenge", HOSTILE_CHALLENGES.values(), ids=list(HOSTILE_CHALLENGES)
)
async def test_hostile_challenge_is_403_or_503(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    challenge: bytes,
    credentials: bool,
) -> None:
    upstream, _ = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS, status=401, headers={"WWW-Authenticate": challenge}
    )
    account = {"upstream_username": "u", "upstream_password": "p"}
    mirror = await make_mirror(upstream, **(account if credentials else {}))
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    await oci_error(resp, (403, "DENIED"), (503, "UNAVAILABLE"))
    assert upstream.count("manifest") <= 3
    if b"{host}" not in challenge:
        assert upstream.count("token") == 0  # no realm here points at the fake
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize("invalid_token", [False, True])
async def test_401_after_a_token_is_not_a_loop(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, invalid_token: bool
) -> None:
    upstream, _ = hostile(auth=True)
    challenge = b'Bearer realm="http://{host}/token",service="fake"'
    if invalid_token:
        challenge += b',error="invalid_token"'
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS,
        when=lambda request: "Authorization" in request.headers,
        status=401,
        headers={"WWW-Authenticate": challenge},
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    await oci_error(resp, (403, "DENIED"), (503, "UNAVAILABLE"))
    assert upstream.count("manifest") <= 4
    assert upstream.count("token") <= 2
    await assert_sound(mirror, caplog)


# --- huge bodies ------------------------------------------------------------------


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_200mb_tag_list_is_refused_without_reading_it(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, length: bool
) -> None:
    upstream, _ = hostile()
    upstream.misbehave = Stream(
        kinds=TAGS,
        size=200 * 1000 * 1000,
        length=length,
        content_type="application/json",
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/tags/list")
    await envelope(resp, 503, "UNAVAILABLE")
    assert upstream.sent["tags"] <= WIRE_SLACK
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_manifest_over_4mib_is_refused(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, length: bool, by: str
) -> None:
    upstream, image = hostile()
    upstream.misbehave = Stream(
        kinds=MANIFESTS, size=4 * MiB + 1, length=length, content_type=OCI_MANIFEST
    )
    mirror = await make_mirror(upstream)
    _, path = manifest_path(image, f"GET {by}")
    await envelope(await mirror.client.get(path), 503, "UNAVAILABLE")
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


# --- content encoding ---------------------------------------------------------------


async def test_upstream_is_asked_for_identity_encoding(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, image = hostile(auth=True)
    mirror = await make_mirror(upstream, cache_tag_ttl="1m")
    assert (await mirror.client.get("/v2/library/app/manifests/1")).status == 200
    for digest in image.blobs:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
    assert (await mirror.client.get("/v2/library/app/tags/list")).status == 200
    mirror.clock.advance(61)  # revalidation: a HEAD
    assert (await mirror.client.head("/v2/library/app/manifests/1")).status == 200

    kinds = {r.kind for r in upstream.log}
    assert {"token", "manifest", "blob", "tags"} <= kinds
    assert upstream.count("manifest", "HEAD") == 1
    encodings = {(r.kind, r.headers.get("Accept-Encoding")) for r in upstream.log}
    assert encodings == {(kind, "identity") for kind in kinds}
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize(
    "path", ["/v2/library/app/manifests/1", "/v2/library/app/tags/list"]
)
async def test_gzipped_answer_is_503_and_never_relayed_as_json(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    upstream, image = hostile()
    upstream.misbehave = gzipped("manifest", "tags")
    mirror = await make_mirror(upstream, upstream_down_backoff="0s")
    await envelope(await mirror.client.get(path), 503, "UNAVAILABLE")
    assert stored(mirror).empty

    upstream.misbehave = None
    resp = await mirror.client.get(path)
    assert resp.status == 200
    body = await resp.read()  # plain JSON now, not gzip
    if "manifests" in path:
        assert body == image.manifest
    else:
        assert json.loads(body) == {"name": "library/app", "tags": ["1"]}
    await assert_sound(mirror, caplog)


async def test_gzipped_error_body_keeps_its_status(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Only bodies the mirror reads must be unencoded: a 404 whose (unread)
    error body is gzipped is still BLOB_UNKNOWN, not a 503."""
    upstream, _image = hostile()
    upstream.misbehave = gzipped("blob")
    mirror = await make_mirror(upstream)
    missing = "sha256:" + "0" * 64
    resp = await mirror.client.get(f"/v2/library/app/blobs/{missing}")
    await envelope(resp, 404, "BLOB_UNKNOWN")
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


# --- blobs of unknown length ----------------------------------------------------------


async def test_chunked_blob_bigger_than_the_cache_streams_through_uncached(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = HostileRegistry()
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    upstream.misbehave = Stream(kinds=BLOBS, length=False, pace=0.002)
    mirror = await make_mirror(upstream, cache_max_size="1MiB", cache_min_free="0")
    tmp = mirror.config.cache.dir / "tmp"
    largest = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal largest
        while not done.is_set():
            largest = max(largest, _tree_size(tmp))
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == data
        await mirror.settle()
    finally:
        done.set()
        await sampler
    assert 0 < upstream.sent["blob"] == len(data)
    assert largest <= MiB
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


def _tree_size(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        try:
            total += entry.stat().st_size
        except FileNotFoundError:
            continue  # renamed or removed while we looked
    return total


# --- redirects --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/library/app/manifests/1"),
        ("HEAD", "/v2/library/app/manifests/1"),
        ("GET", "/v2/library/app/tags/list"),
    ],
)
async def test_redirect_for_manifest_or_tags_is_followed(
    make_mirror: MirrorFactory,
    aiohttp_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
) -> None:
    """As registry.k8s.io sends every request to a regional registry."""
    elsewhere = FakeRegistry()
    image = elsewhere.push_image("library/app", "1", [layer(1), layer(2)])
    server = await aiohttp_server(elsewhere.app())
    upstream, _ = hostile()
    upstream.misbehave = redirect(str(server.make_url(path)), "manifest", "tags")
    mirror = await make_mirror(upstream)
    resp = await mirror.client.request(method, path)
    assert resp.status == 200
    if "manifests" in path:
        assert resp.headers["Docker-Content-Digest"] == image.digest
    if method == "GET" and "manifests" in path:
        assert await resp.read() == image.manifest
    assert [r.path for r in elsewhere.log] == [path]
    await assert_sound(mirror, caplog)


async def test_a_redirect_to_other_bytes_for_a_digest_is_refused_and_not_cached(
    make_mirror: MirrorFactory,
    aiohttp_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    elsewhere = FakeRegistry()
    other = elsewhere.push_image("library/app", "1", [layer(9)])
    server = await aiohttp_server(elsewhere.app())
    upstream, image = hostile()
    location = str(server.make_url(f"/v2/library/app/manifests/{other.digest}"))
    upstream.misbehave = redirect(location, "manifest")
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/app/manifests/{image.digest}")
    await envelope(resp, 503, "UNAVAILABLE")
    assert stored(mirror).empty
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize(
    "location",
    [
        "ftp://127.0.0.1/v2/library/app/manifests/1",
        "javascript:alert(1)",
        "http://[::1",
        "/v2/library/app/manifests/1",  # itself, again and again
    ],
    ids=["ftp", "javascript", "bad-url", "loop"],
)
async def test_redirects_that_loop_or_leave_http_are_refused(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, location: str
) -> None:
    upstream, image = hostile()
    upstream.misbehave = redirect(location, "manifest", "blob")
    mirror = await make_mirror(upstream)
    blob = f"/v2/library/app/blobs/{image.layers[0]}"
    for path in ("/v2/library/app/manifests/1", blob):
        await envelope(await mirror.client.get(path), 503, "UNAVAILABLE")
    values = await samples(mirror)
    refused = 'mirror_upstream_invalid_responses_total{reason="redirect",'
    assert values[refused + 'registry="docker.io"}'] >= 1
    # Bounded: a loop ends after MAX_REDIRECTS hops (per attempt).
    retries = mirror.config.upstream.retries
    assert upstream.count() <= 2 * retries * (MAX_REDIRECTS + 1)
    await assert_sound(mirror, caplog)


# --- races across repositories -----------------------------------------------------


async def joined(mirror: Mirror, kind: str) -> float:
    labels = f'kind="{kind}",registry="docker.io",result="joined"'
    key = f"mirror_cache_requests_total{{{labels}}}"
    return (await samples(mirror)).get(key, 0.0)


@pytest.mark.parametrize("kind", ["blob", "manifest"])
async def test_a_404_in_one_repository_does_not_fail_another(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    upstream, image = hostile()
    digest = image.layers[0] if kind == "blob" else image.digest
    expected = upstream.blobs[digest] if kind == "blob" else image.manifest
    upstream.hidden.add(("library/a", digest))
    release = upstream.hold["library/a"] = asyncio.Event()
    mirror = await make_mirror(upstream)
    segment = "blobs" if kind == "blob" else "manifests"

    first = asyncio.create_task(mirror.client.get(f"/v2/library/a/{segment}/{digest}"))

    async def asked(repo: str) -> bool:
        return any(r.path.startswith(f"/v2/{repo}/") for r in upstream.log)

    await eventually(lambda: asked("library/a"))
    second = asyncio.create_task(mirror.client.get(f"/v2/library/b/{segment}/{digest}"))

    async def second_is_waiting() -> bool:
        # Attached to the first fetch, or started its own: either way, wait.
        return await joined(mirror, kind) >= 1 or await asked("library/b")

    await eventually(second_is_waiting)
    release.set()
    resp_a, resp_b = await asyncio.gather(first, second)
    await envelope(
        resp_a, 404, "BLOB_UNKNOWN" if kind == "blob" else "MANIFEST_UNKNOWN"
    )
    assert resp_b.status == 200
    assert await resp_b.read() == expected
    await assert_sound(mirror, caplog)


# --- answers that lie -----------------------------------------------------------------


def _junk_headers(n: int) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((f"X-Junk-{i}".encode(), b"x") for i in range(n))


def _with_length(delta: int) -> Callable[[Image], Rewrite]:
    def build(image: Image) -> Rewrite:
        length = str(len(image.manifest) + delta).encode()
        return Rewrite(kinds=MANIFESTS, headers={"Content-Length": length})

    return build


# Manifest answers the mirror must refuse (503) and not cache, by name.
REFUSED_MANIFESTS: dict[str, Callable[[Image], Rewrite]] = {
    "length-too-short": _with_length(-10),
    "length-too-long": _with_length(+100),
    "length-garbage": lambda _i: Rewrite(
        kinds=MANIFESTS, headers={"Content-Length": b"12abc"}
    ),
    "length-negative": lambda _i: Rewrite(
        kinds=MANIFESTS, headers={"Content-Length": b"-1"}
    ),
    "digest-header-lies": lambda _i: Rewrite(
        kinds=MANIFESTS, headers={"Docker-Content-Digest": sha256(b"x").encode()}
    ),
    "body-flipped": lambda _i: Rewrite(
        kinds=MANIFESTS, body=lambda body: bytes([body[0] ^ 1]) + body[1:]
    ),
    "cut-mid-headers": lambda _i: Rewrite(kinds=MANIFESTS, cut=30),
    "cut-mid-body": lambda image: Rewrite(
        kinds=MANIFESTS,
        headers={"Content-Length": str(len(image.manifest)).encode()},
        body=lambda body: body[: len(body) // 2],
    ),
    "html-500": lambda _i: html_error(500, "manifest"),
    "html-200": lambda _i: Rewrite(
        kinds=MANIFESTS,
        headers={"Content-Type": b"text/html"},
        drop=frozenset({"Docker-Content-Digest"}),
        body=lambda _body: b"<html>maintenance</html>",
    ),
    "200-headers": lambda _i: Rewrite(kinds=MANIFESTS, add=_junk_headers(200)),
    "100k-header": lambda _i: Rewrite(
        kinds=MANIFESTS, add=((b"X-Big", b"x" * 100_000),)
    ),
    "brotli": lambda _i: Rewrite(
        kinds=MANIFESTS,
        headers={"Content-Encoding": b"br"},
        drop=frozenset({"Docker-Content-Digest"}),
        body=lambda body: b"\x0b" + body,
    ),
}


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("answer", REFUSED_MANIFESTS)
async def test_lying_manifest_answer_is_503_and_not_cached(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, answer: str, by: str
) -> None:
    upstream, image = hostile()
    upstream.misbehave = REFUSED_MANIFESTS[answer](image)
    mirror = await make_mirror(upstream, upstream_down_backoff="0s")
    _, path = manifest_path(image, f"GET {by}")
    await envelope(await mirror.client.get(path), 503, "UNAVAILABLE")
    assert stored(mirror).empty

    upstream.misbehave = None
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert await resp.read() == image.manifest
    await assert_sound(mirror, caplog)


INVALID_DIGEST_HEADERS = {
    "not-hex": b"sha256:zzz",
    "no-algorithm": b"garbage",
    "md5": b"md5:d41d8cd98f00b204e9800998ecf8427e",
    "upper-case-hex": b"sha256:" + b"A" * 64,
    "empty": b"",
    "non-utf8": b"sha256:\xff\xfe",
    "control-char": b"sha256:\x01",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "value", INVALID_DIGEST_HEADERS.values(), ids=list(INVALID_DIGEST_HEADERS)
)
async def test_invalid_digest_header_is_ignored_for_the_computed_one(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    value: bytes,
    method: str,
) -> None:
    upstream, image = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS, headers={"Docker-Content-Digest": value}
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.request(method, "/v2/library/app/manifests/1")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert await resp.read() == (image.manifest if method == "GET" else b"")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert await resp.read() == image.manifest
    assert set(stored(mirror).manifests) == {image.digest}
    await assert_sound(mirror, caplog)


async def test_huge_content_length_on_a_manifest_head(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, image = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS,
        when=lambda request: request.method == "HEAD",
        headers={"Content-Length": b"9" * 30},
    )
    mirror = await make_mirror(upstream, upstream_down_backoff="0s")
    resp = await mirror.client.head("/v2/library/app/manifests/1")
    if resp.status == 200:
        assert int(resp.headers["Content-Length"]) == len(image.manifest)
    else:
        await envelope(resp, 503, "UNAVAILABLE")
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    assert await resp.read() == image.manifest
    await assert_sound(mirror, caplog)


def _blob_length(delta: int) -> Callable[[int], Rewrite]:
    def build(n: int) -> Rewrite:
        return Rewrite(kinds=BLOBS, headers={"Content-Length": str(n + delta).encode()})

    return build


# Blob answers that must never become a complete 200, nor be cached, by name;
# each builder takes the blob's size.
LYING_BLOBS: dict[str, Callable[[int], Rewrite]] = {
    "length-too-short": _blob_length(-100),
    "length-too-long": _blob_length(+100),
    "extra-bytes-no-length": lambda _n: Rewrite(
        kinds=BLOBS, drop=frozenset({"Content-Length"}), body=lambda b: b + b"x"
    ),
    "200-with-partial-content-range": lambda n: Rewrite(
        kinds=BLOBS,
        headers={"Content-Range": f"bytes 100-{n - 1}/{n}".encode()},
        body=lambda b: b[100:],
    ),
    "gzipped": lambda _n: gzipped("blob"),
    "html-500": lambda _n: html_error(500, "blob"),
    "html-200": lambda _n: Rewrite(
        kinds=BLOBS,
        headers={"Content-Type": b"text/html"},
        body=lambda _b: b"<html>login</html>",
    ),
    "cut-mid-headers": lambda _n: Rewrite(kinds=BLOBS, cut=40),
}


@pytest.mark.parametrize("answer", LYING_BLOBS)
async def test_lying_blob_answer_never_completes_wrong_and_is_not_cached(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    upstream = HostileRegistry()
    data = layer(7, 300_000)
    digest = upstream.add_blob(data)
    upstream.misbehave = LYING_BLOBS[answer](len(data))
    mirror = await make_mirror(
        upstream, upstream_down_backoff="0s", upstream_resume_attempts="1"
    )
    result = await outcome(
        await mirror.client.get(f"/v2/library/x/blobs/{digest}"), data
    )
    assert result in {"refused", "cut"}
    await mirror.settle()
    assert stored(mirror).empty

    upstream.misbehave = None
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await outcome(resp, data) == "exact"
    await assert_sound(mirror, caplog)


async def test_resume_answered_at_the_wrong_offset(
    make_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = HostileRegistry()
    data = layer(8, 600_000)
    digest = upstream.add_blob(data)
    upstream.truncate_once[digest] = 200_000
    n = len(data)
    upstream.misbehave = Rewrite(  # a 206 for the resume, but from byte 0
        kinds=BLOBS,
        when=lambda request: "Range" in request.headers,
        status=206,
        headers={"Content-Range": f"bytes 0-{n - 1}/{n}".encode()},
    )
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(f"/v2/library/x/blobs/{digest}")
    assert await outcome(resp, data) in {"exact", "cut"}
    assert upstream.count("blob", "GET") >= 2  # it did try to resume
    await assert_sound(mirror, caplog)


# --- tags/list relayed ----------------------------------------------------------------

HOSTILE_TAG_HEADERS = {
    "link-control-char": {
        "Link": b'</v2/library/app/tags/list?last=1>; rel="next"\x01'
    },
    "link-non-utf8": {"Link": b"</v2/library/app/tags/list?last=\xff>; rel=next"},
    "type-control-char": {"Content-Type": b"application/json\x01"},
    "type-non-utf8": {"Content-Type": b"application/js\xffon"},
    "type-not-a-type": {"Content-Type": b"json"},
}


@pytest.mark.parametrize(
    "headers", HOSTILE_TAG_HEADERS.values(), ids=list(HOSTILE_TAG_HEADERS)
)
async def test_hostile_tag_list_headers_are_not_relayed(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, bytes],
) -> None:
    upstream, _ = hostile()
    upstream.misbehave = Rewrite(kinds=TAGS, headers=headers)
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/tags/list")
    if resp.status == 200:
        assert json.loads(await resp.read()) == {"name": "library/app", "tags": ["1"]}
        for value in resp.raw_headers:
            assert all(0x20 <= c < 0x7F or c == 0x09 for c in value[1]), value
    else:
        await envelope(resp, 503, "UNAVAILABLE")
    await assert_sound(mirror, caplog)


@pytest.mark.parametrize(("status", "expected"), [(500, 503), (404, 404)])
async def test_html_error_page_for_tags_becomes_an_oci_error(
    make_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    status: int,
    expected: int,
) -> None:
    upstream, _ = hostile()
    upstream.misbehave = html_error(status, "tags")
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/tags/list")
    await envelope(resp, expected, "UNAVAILABLE" if expected == 503 else "NAME_UNKNOWN")
    await assert_sound(mirror, caplog)


async def test_raw_answers_reach_the_wire_unchanged(
    aiohttp_server: ServerFactory,
) -> None:
    """The fake itself: a Rewrite is sent byte for byte (every test above
    relies on it, and aiohttp would refuse to send these bytes itself)."""
    upstream, image = hostile()
    upstream.misbehave = Rewrite(
        kinds=MANIFESTS, headers={"Content-Type": b"a\x01\xff"}
    )
    server = await aiohttp_server(upstream.app())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v2/library/app/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: a\x01\xff\r\n" in head
    assert body == image.manifest
