"""The mirror against a Docker Hub look-alike, with dockerd pulling through it.

Upstream here is ``HubEdge`` (see hub_edge.py): the real token-auth registry
behind a proxy that behaves like registry-1.docker.io — rate-limit headers and
429s on manifest GETs, blob GETs redirected to a CDN that refuses credentials —
with faults switched on and off by the tests. Every test starts its own edge,
its own mirror (configured the way it needs) and its own dockerd, since
dockerd takes its mirror's address at start-up; images are pushed under
unique names to the shared ``token_upstream``.

The mirror is configured with an account on the suite's token service, so
every pull exercises the credentialed token flow; retries and back-offs are
short to keep failure paths fast.

Every test runs twice, on two networks (``edge_network``): ``direct``, plain
HTTP over loopback, and ``wan``, where the edge speaks HTTPS with a
certificate from the test CA (which the mirror trusts through
``upstream.ca_file``) and the mirror reaches both of its listeners through a
``LatencyProxy``: 20-40 ms each way, bodies in pieces of at most 1460 bytes.
The token service stays on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.network import LatencyProxy, wan
from tests.fakes.tls import TlsFiles

from .conftest import DockerFactory, MirrorFactory, Published, Publisher, unique
from .docker_daemon import DockerDaemon, DockerEngine, PullError
from .hub_edge import Action, EdgeLog, Fault, HubEdge
from .images import Image
from .mirror_process import MirrorProcess, toml_string
from .skopeo import Skopeo, sha256_of
from .test_dockerd import assert_image
from .test_lifecycle import samples, value
from .test_skopeo import assert_same_image
from .token_server import SERVICE, TokenServer
from .upstream import Upstream

MiB = 1 << 20
# Short enough that failure paths cost well under a second each, long enough
# that a healthy request on a loaded machine never trips them.
FAST_FAILURE: Mapping[str, str | int] = {
    "retries": 2,
    "retry_backoff": "50ms",
    "down_backoff": "300ms",
    "first_byte_timeout": "1s",
    "read_timeout": "2s",
    "resume_attempts": 2,
}


@dataclass(frozen=True)
class Account:
    username: str
    password: str


@dataclass(frozen=True)
class Hub:
    """One test's edge, the mirror in front of it and a dockerd using it."""

    edge: HubEdge
    mirror: MirrorProcess
    docker: DockerDaemon
    account: Account


class HubFactory(Protocol):
    def __call__(
        self,
        *,
        tag_ttl: str = "5m",
        max_stale: str = "unlimited",
        password: str | None = None,
        **upstream: str | int,
    ) -> Hub: ...


@dataclass
class EdgeNetwork:
    """What lies between the mirror and the edge; see the module docstring."""

    kind: Literal["direct", "wan"]
    registry: LatencyProxy | None = None
    """The proxy in front of the registry endpoint (``wan`` only)."""
    cdn: LatencyProxy | None = None
    """The proxy in front of the CDN (``wan`` only)."""


@pytest.fixture(params=["direct", "wan"])
def edge_network(request: pytest.FixtureRequest) -> EdgeNetwork:
    return EdgeNetwork(request.param)


@pytest.fixture
async def edge(
    token_upstream: Upstream,
    edge_network: EdgeNetwork,
    tls_files: TlsFiles,
    latency_proxy: ProxyFactory,
) -> AsyncIterator[HubEdge]:
    over_wan = edge_network.kind == "wan"
    hub_edge = HubEdge(
        token_upstream, tls=tls_files.server_context() if over_wan else None
    )
    await hub_edge.start()
    try:
        if over_wan:
            edge_network.registry = latency_proxy(
                hub_edge.port, request=wan(), response=wan(), seed="registry"
            )
            edge_network.cdn = latency_proxy(
                hub_edge.cdn_port, request=wan(), response=wan(), seed="cdn"
            )
            hub_edge.front_port = edge_network.registry.port
            hub_edge.front_cdn_port = edge_network.cdn.port
        yield hub_edge
    finally:
        # Proxies first: a TLS server's close waits for the peer's
        # close_notify, which would otherwise outlive the test's loop.
        for proxy in (edge_network.registry, edge_network.cdn):
            if proxy is not None:
                proxy.stop()
        await hub_edge.stop()


@pytest.fixture
def account(token_server: TokenServer) -> Account:
    """A fresh Docker Hub account on the token service."""
    created = Account(unique("hubuser-"), unique("pw-"))
    token_server.add_account(created.username, created.password)
    return created


@pytest.fixture
def hub_factory(
    edge: HubEdge,
    account: Account,
    mirror_factory: MirrorFactory,
    docker_factory: DockerFactory,
    tls_files: TlsFiles,
) -> HubFactory:
    """Start the mirror (pulling as ``account``) and a dockerd using it.

    ``tag_ttl`` and ``max_stale`` go to ``[cache]``; ``password`` overrides
    the account's (to configure a wrong one); other keyword arguments override
    ``[upstream]`` settings. An edge serving HTTPS is trusted through
    ``upstream.ca_file``.
    """

    def factory(
        *,
        tag_ttl: str = "5m",
        max_stale: str = "unlimited",
        password: str | None = None,
        **upstream: str | int,
    ) -> Hub:
        settings: dict[str, str | int] = {
            "username": account.username,
            "password": account.password if password is None else password,
            **FAST_FAILURE,
            **upstream,
        }
        if edge.tls is not None:
            settings.setdefault("ca_file", str(tls_files.ca_file))
        mirror = mirror_factory(
            edge.url,
            extra_toml=(
                f"tag_ttl = {toml_string(tag_ttl)}\n"
                f"max_stale = {toml_string(max_stale)}\n"
            ),
            upstream_toml="".join(
                f"{key} = {toml_string(v) if isinstance(v, str) else v}\n"
                for key, v in settings.items()
            ),
        )
        return Hub(edge, mirror, docker_factory(mirror), account)

    return factory


class ImageFactory(Protocol):
    async def __call__(
        self, *, multiarch: bool = False, layer_sizes: list[int] | None = None
    ) -> Published: ...


@pytest.fixture
def hub_image(publish: Publisher, token_upstream: Upstream) -> ImageFactory:
    """Push fresh Docker Hub style images (``library/…``) behind the edge."""

    async def factory(
        *, multiarch: bool = False, layer_sizes: list[int] | None = None
    ) -> Published:
        push = publish.multiarch if multiarch else publish.image
        return await push(
            unique("library/hub-"),
            flavour="docker",
            layer_sizes=layer_sizes,
            to=token_upstream,
        )

    return factory


async def pull(hub: Hub, published: Published) -> None:
    """dockerd pulls the image through the mirror; check it, then remove it.

    Removing it makes the next pull fetch every blob through the mirror again.
    """
    image = published.image
    if not isinstance(image, Image):
        image = image.for_platform("linux", "amd64")
    reference = f"{published.repository}:{published.tag}"
    async with DockerEngine(hub.docker.socket_path) as engine:
        await engine.pull(published.repository, published.tag)
        assert_image(await engine.inspect(reference), published, image)
        await engine.remove(reference)


async def pull_fails(hub: Hub, published: Published) -> PullError:
    async with DockerEngine(hub.docker.socket_path) as engine:
        with pytest.raises(PullError) as failed:
            await engine.pull(published.repository, published.tag)
        assert await engine.inspect(f"{published.repository}:{published.tag}") is None
    return failed.value


async def scrape(
    http: aiohttp.ClientSession, mirror: MirrorProcess
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(f"{mirror.url}/metrics") as response:
        assert response.status == 200
        return samples(await response.text())


def token_accounts(token_server: TokenServer, mark: int) -> set[tuple[str, bool]]:
    """Accounts the token service was asked as since ``mark``; if it agreed."""
    fetched = token_server.requests_since(mark)
    assert fetched, "the mirror never asked the token service"
    return {(request.account, request.granted) for request in fetched}


def assert_cdn_clean(log: EdgeLog) -> None:
    """Blobs came from the CDN, and no CDN request carried credentials."""
    assert log.cdn, f"no blob was fetched from the CDN\n{log.describe()}"
    leaked = [r for r in log.cdn if r.authorization]
    assert not leaked, f"credentials sent to the CDN host\n{log.describe()}"


def cached_blob_exists(mirror: MirrorProcess, digest: str) -> bool:
    hex_digest = digest.removeprefix("sha256:")
    return (mirror.cache_dir / "blobs/sha256" / hex_digest[:2] / hex_digest).exists()


# --- the edge itself ---------------------------------------------------------------


async def test_edge_behaves_like_docker_hub(
    edge: HubEdge,
    hub_image: ImageFactory,
    token_server: TokenServer,
    http: aiohttp.ClientSession,
) -> None:
    """Harness self-test, no mirror: what the tests below rely on."""
    published = await hub_image()
    layer = published.single.layers[0].descriptor
    manifest_url = f"{edge.url}/v2/{published.repository}/manifests/{published.tag}"
    accept = {"Accept": published.single.manifest.media_type}
    edge.limit, edge.remaining, edge.retry_after = 10, 2, 7

    async with http.get(manifest_url, headers=accept) as response:
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
        assert f'realm="{token_server.realm}"' in challenge
    scope = f"repository:{published.repository}:pull"
    async with http.get(
        token_server.realm, params={"service": SERVICE, "scope": scope}
    ) as response:
        token = (await response.json())["token"]
    auth = {**accept, "Authorization": f"Bearer {token}"}

    async with http.head(manifest_url, headers=auth) as response:
        assert response.status == 200
        assert response.headers["ratelimit-remaining"] == "2;w=21600"
    async with http.get(manifest_url, headers=auth) as response:
        assert response.status == 200
        assert response.headers["ratelimit-limit"] == "10;w=21600"
        assert response.headers["ratelimit-remaining"] == "1;w=21600"
        assert response.headers["docker-ratelimit-source"] == "127.0.0.1"
    edge.remaining = 0
    async with http.get(manifest_url, headers=auth) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"

    blob_url = f"{edge.url}/v2/{published.repository}/blobs/{layer.digest}"
    async with http.get(blob_url, headers=auth, allow_redirects=False) as response:
        assert response.status == 307
        location = response.headers["Location"]
    assert location.startswith(f"{edge.cdn_url}/")
    async with http.get(location) as response:
        assert response.status == 200
        assert sha256_of(await response.read()) == layer.digest
    async with http.get(location, headers={"Range": "bytes=100-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == (
            f"bytes 100-{layer.size - 1}/{layer.size}"
        )
        assert len(await response.read()) == layer.size - 100
    credentials = {"Authorization": auth["Authorization"]}
    async with http.get(location, headers=credentials) as response:
        assert response.status == 403
    async with http.get(location.replace("signature=", "signature=0")) as response:
        assert response.status == 403

    assert [(r.listener, r.status, r.note) for r in edge.log_since().requests] == [
        ("registry", 401, ""),
        ("registry", 200, ""),
        ("registry", 200, "pull"),
        ("registry", 429, "throttled"),
        ("registry", 307, ""),
        ("cdn", 200, ""),
        ("cdn", 206, ""),
        ("cdn", 403, "refused"),
        ("cdn", 403, "refused"),
    ]

    await edge.go_down()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(manifest_url)
    await edge.come_up()
    async with http.get(manifest_url, headers=auth) as response:
        assert response.status == 429


# --- credentials ------------------------------------------------------------------


async def test_pulls_as_the_configured_account_and_reports_a_wrong_password(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    token_server: TokenServer,
    http: aiohttp.ClientSession,
) -> None:
    right = hub_factory()
    wrong = hub_factory(password="not-the-password")
    username = right.account.username
    published = await hub_image()

    tokens = token_server.mark()
    await pull_fails(wrong, published)
    assert token_accounts(token_server, tokens) == {(username, False)}
    log = wrong.edge.log_since()
    assert not log.pulls, log.describe()
    assert not log.cdn, log.describe()
    complaint = "rejected the configured credentials"
    errors = [
        line for line in wrong.mirror.log_text().splitlines() if complaint in line
    ]
    assert errors, wrong.mirror.log_text()
    assert all(" ERROR " in line for line in errors), errors
    assert username not in wrong.mirror.log_text()  # no account name in logs
    metrics = await scrape(http, wrong.mirror)
    assert (
        value(
            metrics,
            "mirror_upstream_auth_failures_total",
            registry="docker.io",
            reason="rejected",
        )
        > 0
    )

    tokens, mark = token_server.mark(), right.edge.mark()
    await pull(right, published)
    assert token_accounts(token_server, tokens) == {(username, True)}
    log = right.edge.log_since(mark)
    served = [r for r in log.registry if r.status in (200, 307)]
    assert served, log.describe()
    assert all(r.authorization for r in served), (
        f"content served without a token\n{log.describe()}"
    )
    assert_cdn_clean(log)


# --- the rate limit -------------------------------------------------------------


async def test_unchanged_tag_costs_no_pull_within_ttl_and_only_heads_after(
    hub_factory: HubFactory, hub_image: ImageFactory
) -> None:
    # Long enough that two cached pulls surely end within it, so that "no
    # upstream request" is always asserted; short enough to wait out.
    ttl = 6.0
    hub = hub_factory(tag_ttl=f"{ttl:g}s")
    published = await hub_image()
    await pull(hub, published)
    # The tag was confirmed upstream during that pull: before now.
    confirmed_by = time.monotonic()
    remaining = hub.edge.remaining

    mark = hub.edge.mark()
    for _ in range(2):
        await pull(hub, published)
    log = hub.edge.log_since(mark)
    assert not log.pulls, f"a cached pull spent a pull\n{log.describe()}"
    took = time.monotonic() - confirmed_by
    assert took < ttl, f"two cached pulls took {took:.1f}s, past the {ttl}s TTL"
    assert not log.requests, f"upstream asked within the TTL\n{log.describe()}"

    await asyncio.sleep(max(0.0, confirmed_by + ttl + 0.1 - time.monotonic()))
    mark = hub.edge.mark()
    await pull(hub, published)
    log = hub.edge.log_since(mark)
    tag_path = f"/v2/{published.repository}/manifests/{published.tag}"
    assert log.requests, "the expired tag was not revalidated"
    assert all((r.method, r.path) == ("HEAD", tag_path) for r in log.requests), (
        f"revalidation did more than a HEAD of the tag\n{log.describe()}"
    )
    assert hub.edge.remaining == remaining


async def test_ratelimit_gauges_match_the_last_headers(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory()
    hub.edge.limit, hub.edge.remaining = 40, 23
    published = await hub_image(multiarch=True)
    mark = hub.edge.mark()

    await pull(hub, published)

    # The index and the amd64 manifest: two pulls spent.
    log = hub.edge.log_since(mark)
    assert len(log.pulls) == 2, log.describe()
    assert hub.edge.last_ratelimit == (40, 21)
    metrics = await scrape(http, hub.mirror)
    assert value(metrics, "mirror_upstream_ratelimit_limit", registry="docker.io") == 40
    assert (
        value(metrics, "mirror_upstream_ratelimit_remaining", registry="docker.io")
        == 21
    )


async def test_cached_image_pulls_while_rate_limited(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    # A zero TTL makes every pull revalidate the tag upstream.
    hub = hub_factory(tag_ttl="0s")
    published = await hub_image()
    await pull(hub, published)

    hub.edge.remaining = 0
    mark = hub.edge.mark()
    await pull(hub, published)

    log = hub.edge.log_since(mark)
    assert log.manifests("HEAD"), f"the tag was not revalidated\n{log.describe()}"
    assert not log.manifests("GET"), f"a cached pull spent a pull\n{log.describe()}"
    metrics = await scrape(http, hub.mirror)
    assert (
        value(metrics, "mirror_upstream_ratelimit_remaining", registry="docker.io") == 0
    )


async def test_uncached_image_while_rate_limited_gets_429(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory()
    published = await hub_image()
    hub.edge.remaining, hub.edge.retry_after = 0, 2
    url = f"{hub.mirror.url}/v2/{published.repository}/manifests/{published.tag}"

    async with http.get(url) as response:
        body = await response.json(content_type=None)
        assert response.status == 429, body
        assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert int(response.headers["Retry-After"]) > 0
    gets = hub.edge.log_since().manifests("GET")
    assert [r.note for r in gets if r.authorization] == ["throttled"], gets

    await pull_fails(hub, published)
    # Throttled, the mirror does not even ask: no GET reached the edge.
    assert hub.edge.log_since().manifests("GET") == gets

    # Once the window has room again and Retry-After has passed, it pulls.
    hub.edge.remaining = 10
    await asyncio.sleep(hub.edge.retry_after)
    await pull(hub, published)


# --- upstream failing -------------------------------------------------------------


@pytest.mark.parametrize("failure", ["down", "5xx", "stall"])
async def test_cached_image_pulls_while_upstream_fails(
    failure: str,
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory(tag_ttl="0s", first_byte_timeout="500ms")
    published = await hub_image()
    await pull(hub, published)

    if failure == "down":
        await hub.edge.go_down()
    elif failure == "5xx":
        hub.edge.inject(Fault("error", "manifest", status=503))
    else:
        hub.edge.inject(Fault("stall", "manifest"))
    await pull(hub, published)

    url = f"{hub.mirror.url}/v2/{published.repository}/manifests/{published.tag}"
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers.get("X-Mirror-Stale") == "1"
        assert response.headers["Docker-Content-Digest"] == published.digest
    metrics = await scrape(http, hub.mirror)
    assert value(
        metrics,
        "mirror_cache_requests_total",
        registry="docker.io",
        kind="tag",
        result="stale",
    )

    # Once upstream answers again (and down_backoff has passed), tags are
    # fresh again; polled, since a loaded machine can trip the short timeouts.
    hub.edge.clear()
    await hub.edge.come_up()
    deadline = time.monotonic() + 10.0
    while True:
        async with http.get(url) as response:
            assert response.status == 200
            if "X-Mirror-Stale" not in response.headers:
                break
        assert time.monotonic() < deadline, "still stale after upstream recovered"
        await asyncio.sleep(0.2)


async def test_stale_tag_is_not_served_past_max_stale(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    max_stale = 1.0
    hub = hub_factory(tag_ttl="0s", max_stale=f"{max_stale:g}s")
    published = await hub_image()
    await pull(hub, published)
    confirmed_by = time.monotonic()

    await hub.edge.go_down()
    await asyncio.sleep(max(0.0, confirmed_by + max_stale + 0.2 - time.monotonic()))
    await pull_fails(hub, published)

    url = f"{hub.mirror.url}/v2/{published.repository}/manifests/{published.tag}"
    async with http.get(url) as response:
        body = await response.json(content_type=None)
        assert response.status == 503, body
        assert body["errors"][0]["code"] == "UNAVAILABLE"


async def test_transient_failures_are_retried(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory()
    published = await hub_image()
    faults = [
        hub.edge.inject(Fault("error", "manifest", times=1, status=502)),
        hub.edge.inject(Fault("error", "blob", times=1, status=503)),
        # Held past first_byte_timeout: the mirror must give up and ask again.
        hub.edge.inject(Fault("stall", "cdn", times=1, hold=10.0)),
    ]

    await pull(hub, published)

    assert [fault.applied for fault in faults] == [1, 1, 1]
    metrics = await scrape(http, hub.mirror)
    retried = {
        kind: value(
            metrics, "mirror_upstream_retries_total", registry="docker.io", kind=kind
        )
        for kind in ("manifest", "manifest_head", "blob")
    }
    # One manifest request and two blob requests (5xx, stall) were asked again.
    assert retried["manifest"] + retried["manifest_head"] >= 1, retried
    assert retried["blob"] >= 2, retried


# --- blob bodies ----------------------------------------------------------------


@pytest.mark.parametrize("action", ["corrupt", "cut"])
async def test_bad_blob_body_is_never_cached_nor_served_complete(
    action: Action,
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory()
    published = await hub_image(layer_sizes=[MiB])
    layer = published.single.layers[0].descriptor
    hub.edge.inject(Fault(action, "cdn", digest=layer.digest, after=100_000))
    url = f"{hub.mirror.url}/v2/{published.repository}/blobs/{layer.digest}"

    for attempt in range(2):
        async with http.get(url) as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                body = None
            if response.status == 200:
                assert body is None or len(body) < layer.size, (
                    f"attempt {attempt}: a bad body was served as a complete 200\n"
                    f"{hub.edge.log_since().describe()}"
                )
        assert not cached_blob_exists(hub.mirror, layer.digest)
    fetches = [r for r in hub.edge.log_since().cdn if r.digest == layer.digest]
    # Each attempt: one body, or for cuts one body and each resume, all bad.
    expected = 2 * (
        1 if action == "corrupt" else 1 + int(FAST_FAILURE["resume_attempts"])
    )
    assert [r.note for r in fetches] == [action] * expected, fetches
    metrics = await scrape(http, hub.mirror)
    assert (
        value(
            metrics,
            "mirror_verification_failures_total",
            registry="docker.io",
            kind="blob",
        )
        >= 2
    )

    hub.edge.clear()
    await pull(hub, published)
    assert cached_blob_exists(hub.mirror, layer.digest)


async def test_cut_blob_is_resumed_with_a_range_request(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    http: aiohttp.ClientSession,
) -> None:
    hub = hub_factory()
    published = await hub_image(layer_sizes=[2 * MiB])
    layer = published.single.layers[0].descriptor
    hub.edge.inject(Fault("cut", "cdn", times=1, digest=layer.digest, after=300_000))
    mark = hub.edge.mark()

    await pull(hub, published)

    fetches = [r for r in hub.edge.log_since(mark).cdn if r.digest == layer.digest]
    described = "\n".join(f"  {r}" for r in fetches)
    assert [r.note for r in fetches] == ["cut", ""], described
    assert fetches[0].range_start is None, described
    resumed_at = fetches[1].range_start
    assert resumed_at is not None, described
    assert 0 < resumed_at <= 300_000, described
    assert fetches[1].status == 206, described
    metrics = await scrape(http, hub.mirror)
    assert value(metrics, "mirror_blob_resumes_total", registry="docker.io") >= 1
    assert cached_blob_exists(hub.mirror, layer.digest)


async def test_cdn_never_receives_credentials(
    hub_factory: HubFactory, hub_image: ImageFactory
) -> None:
    hub = hub_factory()
    published = await hub_image(multiarch=True)
    amd64 = published.multi.for_platform("linux", "amd64")
    mark = hub.edge.mark()

    await pull(hub, published)

    log = hub.edge.log_since(mark)
    redirected = [r for r in log.registry if r.kind == "blob" and r.status == 307]
    assert {r.reference for r in redirected} == amd64.blob_digests, log.describe()
    # The mirror held a token for those requests, so it had something to leak.
    assert all(r.authorization for r in redirected), log.describe()
    assert_cdn_clean(log)
    assert {r.digest for r in log.cdn} == amd64.blob_digests, log.describe()
    assert all(r.status == 200 for r in log.cdn), log.describe()
    assert {r.host for r in log.cdn} == {hub.edge.cdn_host}


# --- over a slow network, with real clients -----------------------------------------


def wan_proxies(network: EdgeNetwork) -> tuple[LatencyProxy, LatencyProxy]:
    assert network.registry is not None
    assert network.cdn is not None
    return network.registry, network.cdn


def assert_fetched_once(log: EdgeLog, digests: set[str]) -> None:
    """Each blob was redirected once and fetched from the CDN once, whole."""
    redirected = Counter(
        r.reference for r in log.registry if r.kind == "blob" and r.status == 307
    )
    fetched = Counter(r.digest for r in log.cdn if r.status == 200)
    expected = dict.fromkeys(digests, 1)
    assert redirected == expected, log.describe()
    assert fetched == expected, log.describe()
    assert all(r.status == 200 and not r.note for r in log.cdn), log.describe()


@pytest.mark.parametrize("edge_network", ["wan"], indirect=True)
async def test_dockerd_pull_over_a_slow_tls_network_fetches_each_blob_once(
    hub_factory: HubFactory, hub_image: ImageFactory, edge_network: EdgeNetwork
) -> None:
    registry, cdn = wan_proxies(edge_network)
    hub = hub_factory()
    published = await hub_image(layer_sizes=[100_000, 700_000, MiB, 2 * MiB])
    image = published.single
    mark = hub.edge.mark()

    await pull(hub, published)  # checks the image id, layers and RepoDigests

    log = hub.edge.log_since(mark)
    assert_fetched_once(log, image.blob_digests)
    # The tag was looked up with a HEAD; the manifest by digest cost one pull.
    assert len(log.pulls) == 1, log.describe()
    assert hub.edge.url.startswith("https://")
    layer_bytes = sum(layer.descriptor.size for layer in image.layers)
    assert cdn.counters.bytes_to_client > layer_bytes
    assert registry.counters.bytes_to_client > 0

    mark = hub.edge.mark()
    await pull(hub, published)
    log = hub.edge.log_since(mark)
    assert not log.cdn, log.describe()
    assert not [r for r in log.registry if r.kind == "blob"], log.describe()
    assert not [r for r in log.manifests() if r.by_digest], log.describe()


@pytest.mark.parametrize("edge_network", ["wan"], indirect=True)
async def test_concurrent_skopeo_copies_over_a_slow_tls_network(
    hub_factory: HubFactory,
    hub_image: ImageFactory,
    edge_network: EdgeNetwork,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    _, cdn = wan_proxies(edge_network)
    # The CDN at 4 MiB/s per connection: the copies overlap the downloads.
    cdn.response.rate = 4 * MiB
    hub = hub_factory()
    published = await hub_image(layer_sizes=[3 * MiB, 2 * MiB])
    image = published.single
    reference = f"{published.repository}:{published.tag}"
    mark = hub.edge.mark()

    copies = await asyncio.gather(
        *(
            skopeo.pull_to_dir(hub.mirror.host, reference, tmp_path / f"copy{n}")
            for n in range(3)
        )
    )

    for got in copies:
        assert got.manifest_digest == image.digest
        assert_same_image(got, published, image)
    assert_fetched_once(hub.edge.log_since(mark), image.blob_digests)
