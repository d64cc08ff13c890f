"""The HTTP surface: input validation, error envelope, tags, metrics, auth."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MirrorFactory
from tests.fakes.registry import FakeRegistry


async def error_code(resp: object) -> str:
    body = json.loads(await resp.read())  # type: ignore[attr-defined]
    return str(body["errors"][0]["code"])


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/UPPER/manifests/1", 400, "NAME_INVALID"),
        ("/v2/a--/manifests/1", 400, "NAME_INVALID"),
        ("/v2/library/x/manifests/-bad", 400, "TAG_INVALID"),
        ("/v2/library/x/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/library/x/manifests/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/x/blobs/sha256:" + "G" * 64, 400, "DIGEST_INVALID"),
        ("/v2/library/x/blobs/latest", 400, "DIGEST_INVALID"),
        ("/v2/library/x/nothing", 404, "NOT_FOUND"),
        ("/v2/library/x/manifests/1?ns=ghcr.io", 404, "NAME_UNKNOWN"),
    ],
)
async def test_bad_input_gets_an_oci_error_and_never_reaches_upstream(
    make_mirror: MirrorFactory, path: str, status: int, code: str
) -> None:
    upstream = FakeRegistry()
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get(path)
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await error_code(resp) == code
    assert upstream.log == []


async def test_containerd_ns_parameter_for_docker_hub_is_accepted(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"x" * 100])
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1?ns=docker.io")
    assert resp.status == 200
    assert await resp.read() == image.manifest


async def test_tags_list_is_passed_through_with_pagination(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    for tag in ("1", "2"):
        upstream.push_image("someuser/app", tag, [tag.encode() * 100])
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/someuser/app/tags/list?n=10&last=0&junk=1")
    assert resp.status == 200
    assert json.loads(await resp.read()) == {"name": "someuser/app", "tags": ["1", "2"]}
    asked = upstream.requests("tags")[0]
    assert asked.path == "/v2/someuser/app/tags/list"
    # n and last go upstream; nothing else a client adds does.
    assert sorted(asked.query.split("&")) == ["last=0", "n=10"]

    # One tag a page: upstream's Link to the next page is passed on.
    resp = await mirror.client.get("/v2/someuser/app/tags/list?n=1")
    assert json.loads(await resp.read()) == {"name": "someuser/app", "tags": ["1"]}
    assert upstream.requests("tags")[1].query == "n=1"
    link = resp.headers["Link"]
    assert link == '</v2/someuser/app/tags/list?last=1&n=1>; rel="next"'
    resp = await mirror.client.get(link[1 : link.index(">")])
    assert json.loads(await resp.read()) == {"name": "someuser/app", "tags": ["2"]}
    assert sorted(upstream.requests("tags")[2].query.split("&")) == ["last=1", "n=1"]
    resp = await mirror.client.get("/v2/someuser/nothing/tags/list")
    assert resp.status == 404
    assert await error_code(resp) == "NAME_UNKNOWN"


async def test_metrics_count_requests_cache_results_and_upstream_bytes(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [b"y" * 5000])
    mirror = await make_mirror(upstream)
    for _ in range(2):
        resp = await mirror.client.get(f"/v2/library/app/blobs/{image.layers[0]}")
        assert len(await resp.read()) == 5000
        await mirror.settle()
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    assert (
        'mirror_http_requests_total{method="GET",route="blob",status="200"} 2.0' in text
    )
    hub = 'registry="docker.io"'
    assert f'mirror_cache_requests_total{{kind="blob",{hub},result="miss"}} 1.0' in text
    assert (
        'mirror_cache_requests_total{kind="blob",registry="docker.io",result="hit"} 1.0'
        in text
    )
    assert (
        'mirror_upstream_bytes_total{kind="blob",registry="docker.io"} 5000.0' in text
    )
    assert (
        f'mirror_upstream_requests_total{{kind="blob",{hub},result="200"}} 1.0' in text
    )
    assert "mirror_blob_downloads_in_progress 0.0" in text


async def test_upstream_token_is_fetched_once_and_reused(
    make_mirror: MirrorFactory,
) -> None:
    upstream = FakeRegistry(auth=True)
    image = upstream.push_image("library/app", "1", [b"z" * 1000])
    mirror = await make_mirror(upstream)
    resp = await mirror.client.get("/v2/library/app/manifests/1")
    assert resp.status == 200
    for blob in image.blobs:
        resp = await mirror.client.get(f"/v2/library/app/blobs/{blob}")
        assert resp.status == 200
    assert upstream.tokens_issued == 1
    # One 401 to learn the challenge; every later request authenticated up front.
    assert upstream.count("token") == 1
    unauthorized = [r for r in upstream.log if "Authorization" not in r.headers]
    assert [r.path for r in unauthorized] == ["/v2/library/app/manifests/1", "/token"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/", 200, None),
        ("GET", "/v2/library/x/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("POST", "/v2", 405, "UNSUPPORTED"),
        ("PUT", "/metrics", 405, "UNSUPPORTED"),
        ("GET", "/nowhere", 404, "NOT_FOUND"),
        ("DELETE", "/v2/library/x/manifests/1", 405, "UNSUPPORTED"),
    ],
)
async def test_an_unknown_expect_never_gets_aiohttps_plain_417(
    make_mirror: MirrorFactory, method: str, path: str, status: int, code: str | None
) -> None:
    """aiohttp answers an Expect it does not know with a text/plain 417 that
    echoes the header; no route may fall through to that (found by fuzzing)."""
    mirror = await make_mirror(FakeRegistry())
    resp = await mirror.client.request(method, path, headers={"Expect": "x<script>"})
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.read()
    assert b"<script>" not in body
    if code is not None:
        assert await error_code(resp) == code
