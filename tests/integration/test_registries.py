"""Every registry through one mirror (issue 9), with real parts.

One ``mirror serve`` process stands in front of three real upstreams:

* **docker.io**: the Docker Hub look-alike (``HubEdge``: rate-limit headers,
  blobs redirected to a CDN) in front of the token-auth registry; the mirror
  pulls as an account on the suite's token service (``[upstream]``).
* **ghcr.io**: a distribution registry that demands its own account with
  HTTP Basic (distribution's htpasswd auth); nothing is served anonymously,
  so every pull proves the mirror sent ghcr.io's credentials, read from its
  ``password_file``, and not Docker Hub's. (Docker Hub already covers the
  Bearer flow with an account; the suite's token service hands anonymous
  tokens to anyone, so behind it a wrong or missing password would go
  unnoticed.)
* **quay.io**: an anonymous distribution registry, with short retries and
  back-off so that stopping it fails requests promptly.

ghcr.io and quay.io are ``[registries."…"]`` tables pointing at the local
registries. Clients reach them the ways real ones do: containerd with one
``hosts.toml`` per registry (``?ns=<host>`` on every request), podman with
``registries.conf`` mirrors (``127.0.0.1:PORT/ghcr.io``: a path prefix), skopeo
and dockerd with path-prefixed names (``127.0.0.1:PORT/ghcr.io/owner/app``),
and dockerd's ``registry-mirrors`` for Docker Hub. Fallbacks to the real
registries go to a closed loopback port (see ``ClosedPort``).

Each client test pushes its own set of images (``ImageSet``): an app on
ghcr.io, a tool on quay.io whose first layer is the app's (same bytes, same
digest), and a Docker Hub image. Every upstream must only ever be asked for
its own repositories (each registry's live under namespaces of their own,
``owner/``, ``org/`` and ``library/``, so a stray is plain to see; ``both/``
names exist on ghcr.io and quay.io alike and are told apart by digest), and
the shared layer must be fetched from upstream once across both registries.

The upstreams, the mirror and containerd are module-scoped (as is the event
loop, which the Hub edge runs in); the last tests stop quay.io's registry
(restarting it after) and check the whole of every upstream's log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from . import expect
from .conftest import (
    DockerFactory,
    Published,
    Publisher,
    running_containerd,
    start_or_fail,
    unique,
    watch_log,
)
from .containerd_daemon import Containerd
from .daemon_dirs import make_daemon_dir, remove_daemon_dir
from .docker_daemon import DockerEngine
from .hub_edge import EdgeLog, HubEdge
from .images import MEDIA_TYPES, build_signature
from .mirror_process import MirrorProcess, toml_string
from .podman import Podman
from .skopeo import Skopeo, sha256_of
from .test_dockerd import assert_image
from .test_hub import Account
from .test_skopeo import assert_same_image
from .token_server import TokenRequest, TokenServer
from .tools import require_tool
from .upstream import Request, RequestLog, Upstream, htpasswd_auth

pytestmark = pytest.mark.asyncio(loop_scope="module")

GHCR, QUAY, HUB = "ghcr.io", "quay.io", "docker.io"
# Where each registry's test repositories live: a request for a repository
# outside its registry's namespaces reached the wrong upstream. "both/" holds
# the names pushed to ghcr.io and quay.io alike, told apart by digest.
NAMESPACES = {
    GHCR: ("owner/", "both/"),
    QUAY: ("org/", "both/"),
    HUB: ("library/",),
}
ACCEPT = ", ".join(
    MEDIA_TYPES[flavour][kind]
    for flavour in ("oci", "docker")
    for kind in ("manifest", "index")
)
# quay.io is stopped in one test: fail fast, then stay "down" only briefly.
QUICK_FAILURE: Mapping[str, str | int] = {
    "retries": 1,
    "retry_backoff": "50ms",
    "retry_max_time": "2s",
    "down_backoff": "1s",
    "connect_timeout": "2s",
}
# Bound on "the mirror answers promptly that quay.io is down".
PROMPT = 10.0


@dataclass(frozen=True)
class ImageSet:
    """One client's images: ghcr.io's app and quay.io's tool share a layer."""

    app: Published
    tool: Published
    hub: Published

    @property
    def shared(self) -> str:
        """The digest of the layer app and tool share (their first)."""
        return self.app.single.layers[0].digest

    def ref(self, registry: str) -> str:
        """``<registry>/<repository>:<tag>`` of this set's image there."""
        published = {GHCR: self.app, QUAY: self.tool, HUB: self.hub}[registry]
        return f"{registry}/{published.repository}:{published.tag}"


@dataclass(frozen=True)
class Marks:
    ghcr: int
    quay: int
    hub: int
    tokens: int


@dataclass(frozen=True)
class Seen:
    """What each upstream was asked between two points."""

    ghcr: RequestLog
    quay: RequestLog
    hub: EdgeLog
    tokens: list[TokenRequest]

    def describe(self) -> str:
        return (
            f"ghcr.io upstream:\n{self.ghcr.describe()}\n"
            f"quay.io upstream:\n{self.quay.describe()}\n"
            f"docker.io edge:\n{self.hub.describe()}"
        )

    def assert_isolated(self) -> None:
        """No upstream was asked for another registry's repository."""
        for registry, requests in (
            (GHCR, self.ghcr.requests),
            (QUAY, self.quay.requests),
            (HUB, self.hub.registry),
        ):
            strays = strangers(requests, NAMESPACES[registry])
            assert not strays, (
                f"{registry}'s upstream was asked for repositories that are not "
                f"its own: {strays}\n{self.describe()}"
            )

    def assert_shared_fetched_once(self, images: ImageSet) -> None:
        """The shared layer came from upstream once, from either registry."""
        gets = (
            self.ghcr.blob_gets(successful=True)[images.shared]
            + self.quay.blob_gets(successful=True)[images.shared]
        )
        assert gets == 1, (
            f"the layer ghcr.io and quay.io share was fetched {gets} times "
            f"from upstream, not once\n{self.describe()}"
        )

    def assert_hub_fetched_once(self, published: Published) -> None:
        """Each of the Hub image's blobs came from the CDN once."""
        got = Counter(
            r.digest for r in self.hub.cdn if r.method == "GET" and r.status == 200
        )
        expected = dict.fromkeys(published.single.blob_digests, 1)
        assert dict(got) == expected, (
            f"docker.io blob downloads differ from one per blob\n{self.describe()}"
        )


def strangers(requests: Iterable[Request], namespace: tuple[str, ...]) -> list[str]:
    """Repositories named in ``requests`` that lie outside ``namespace``."""
    return sorted(
        {
            name
            for request in requests
            if (name := request.named) is not None and not name.startswith(namespace)
        }
    )


@dataclass
class Registries:
    """The three upstreams, their accounts, and how to publish to them."""

    hub: HubEdge
    hub_registry: Upstream
    ghcr: Upstream
    quay: Upstream
    token_server: TokenServer
    hub_account: Account
    ghcr_account: Account
    publisher: Publisher

    def mark(self) -> Marks:
        return Marks(
            ghcr=self.ghcr.mark(),
            quay=self.quay.mark(),
            hub=self.hub.mark(),
            tokens=self.token_server.mark(),
        )

    async def since(self, marks: Marks) -> Seen:
        ghcr, quay = await asyncio.gather(
            self.ghcr.requests_since(marks.ghcr), self.quay.requests_since(marks.quay)
        )
        return Seen(
            ghcr=ghcr,
            quay=quay,
            hub=self.hub.log_since(marks.hub),
            tokens=self.token_server.requests_since(marks.tokens),
        )

    async def publish(self, client: str) -> ImageSet:
        """Push a fresh ``ImageSet`` named after ``client``."""
        shared = unique(f"shared-{client}-")
        sizes = [300_000, 200_000]
        app, tool, hub = await asyncio.gather(
            self.publisher.image(
                f"owner/{unique(f'app-{client}-')}",
                layer_sizes=sizes,
                layer_seeds=[shared],
                to=self.ghcr,
            ),
            self.publisher.image(
                f"org/{unique(f'tool-{client}-')}",
                layer_sizes=sizes,
                layer_seeds=[shared],
                to=self.quay,
            ),
            self.publisher.image(
                f"library/{unique(f'hub-{client}-')}",
                flavour="docker",
                layer_sizes=[250_000],
                to=self.hub_registry,
            ),
        )
        images = ImageSet(app=app, tool=tool, hub=hub)
        assert tool.single.layers[0].digest == images.shared
        assert len(app.single.blob_digests & tool.single.blob_digests) == 1
        return images


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_account(token_server: TokenServer) -> Account:
    account = Account(unique("hubuser-"), unique("pw-"))
    token_server.add_account(account.username, account.password)
    return account


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(token_upstream: Upstream) -> AsyncIterator[HubEdge]:
    edge = HubEdge(token_upstream)
    await edge.start()
    try:
        yield edge
    finally:
        await edge.stop()


@pytest.fixture(scope="module")
def ghcr_account() -> Account:
    return Account(unique("ghcr-bot-"), unique("ghcr-pw-"))


@pytest.fixture(scope="module")
def ghcr(
    registry_bin: str,
    skopeo: Skopeo,
    ghcr_account: Account,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Upstream]:
    """ghcr.io's stand-in: HTTP Basic with its own account, nothing anonymous."""
    workdir = tmp_path_factory.mktemp("ghcr")
    try:
        auth = htpasswd_auth(
            workdir / "htpasswd", ghcr_account.username, ghcr_account.password
        )
    except OSError as error:  # no libcrypt with bcrypt: the system is broken
        pytest.fail(f"cannot make a bcrypt htpasswd file: {error}")
    registry = Upstream(
        binary=registry_bin,
        skopeo=skopeo,
        workdir=workdir,
        auth=auth,
        credentials=(ghcr_account.username, ghcr_account.password),
    )
    try:
        start_or_fail(registry.start)
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def quay(
    registry_bin: str, skopeo: Skopeo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    """quay.io's stand-in: anonymous."""
    registry = Upstream(
        binary=registry_bin, skopeo=skopeo, workdir=tmp_path_factory.mktemp("quay")
    )
    try:
        start_or_fail(registry.start)
        yield registry
    finally:
        registry.stop()


def toml_table(name: str, settings: Mapping[str, str | int]) -> str:
    values = "".join(
        f"{key} = {toml_string(v) if isinstance(v, str) else v}\n"
        for key, v in settings.items()
    )
    return f"\n[{name}]\n{values}"


@pytest.fixture(scope="module")
def mirror(
    hub: HubEdge,
    hub_account: Account,
    ghcr: Upstream,
    ghcr_account: Account,
    quay: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MirrorProcess]:
    """The one mirror in front of all three upstreams.

    Named like conftest's ``mirror`` (which it overrides in this module) so
    that its log is attached to failing tests the usual way.
    """
    workdir = tmp_path_factory.mktemp("mirror")
    password_file = workdir / "ghcr-password"
    password_file.write_text(ghcr_account.password + "\n")
    registries = toml_table(
        f"registries.{toml_string(GHCR)}",
        {
            "url": ghcr.url,
            "username": ghcr_account.username,
            "password_file": str(password_file),
        },
    ) + toml_table(
        f"registries.{toml_string(QUAY)}", {"url": quay.url, **QUICK_FAILURE}
    )
    process = MirrorProcess(
        upstream_url=hub.url,
        workdir=workdir,
        upstream_toml=(
            f"username = {toml_string(hub_account.username)}\n"
            f"password = {toml_string(hub_account.password)}\n"
        ),
        extra_toml='tag_ttl = "5m"\n' + registries,
    )
    try:
        start_or_fail(process.start)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def registries(
    hub: HubEdge,
    token_upstream: Upstream,
    ghcr: Upstream,
    quay: Upstream,
    token_server: TokenServer,
    hub_account: Account,
    ghcr_account: Account,
    tmp_path_factory: pytest.TempPathFactory,
) -> Registries:
    return Registries(
        hub=hub,
        hub_registry=token_upstream,
        ghcr=ghcr,
        quay=quay,
        token_server=token_server,
        hub_account=hub_account,
        ghcr_account=ghcr_account,
        publisher=Publisher(ghcr, tmp_path_factory.mktemp("images")),
    )


@pytest.fixture(autouse=True)
def _upstream_logs(request: pytest.FixtureRequest, registries: Registries) -> None:
    """Attach ghcr.io's and quay.io's registry logs to failing tests (the
    mirror's, the Hub registry's and containerd's come from conftest)."""
    watch_log(request, "ghcr.io registry", registries.ghcr.process)
    watch_log(request, "quay.io registry", registries.quay.process)


@pytest.fixture(scope="module")
def containerd(
    containerd_bin: str, ctr_bin: str, mirror: MirrorProcess
) -> Iterator[Containerd]:
    """containerd with a ``hosts.toml`` per registry, all naming the mirror."""
    with running_containerd(
        containerd_bin, ctr_bin, mirror.url, registries=(HUB, GHCR, QUAY)
    ) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def podman(mirror: MirrorProcess) -> Iterator[Podman]:
    binary = require_tool("podman")
    client = Podman(
        binary=binary,
        directory=make_daemon_dir(),
        mirrors={
            GHCR: f"{mirror.host}/{GHCR}",
            QUAY: f"{mirror.host}/{QUAY}",
            HUB: mirror.host,
        },
    )
    try:
        yield client
    finally:
        client.close()
        remove_daemon_dir(client.directory)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client for direct requests (conftest's runs in another loop)."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


def manifest_bytes(published: Published) -> bytes:
    """The generated manifest, byte for byte (from the OCI layout)."""
    hex_digest = published.digest.removeprefix("sha256:")
    return (published.layout.path / "blobs/sha256" / hex_digest).read_bytes()


# --- clients --------------------------------------------------------------------


async def test_containerd_pulls_every_registry_through_one_mirror(
    registries: Registries, containerd: Containerd
) -> None:
    images = await registries.publish("ctr")
    marks = registries.mark()

    await containerd.pull(images.ref(GHCR))
    assert (await containerd.image_digests())[images.ref(GHCR)] == images.app.digest
    # Without this the tool's pull would find the shared layer in containerd's
    # own store and never ask the mirror for it.
    await containerd.remove_image(images.ref(GHCR))
    assert images.shared not in await containerd.content_digests()

    await containerd.pull(images.ref(QUAY))
    await containerd.pull(images.ref(HUB))
    pulled = await containerd.image_digests()
    assert pulled[images.ref(QUAY)] == images.tool.digest
    assert pulled[images.ref(HUB)] == images.hub.digest
    content = await containerd.content_digests()
    assert images.tool.single.blob_digests | images.hub.single.blob_digests <= content

    seen = await registries.since(marks)
    seen.assert_isolated()
    seen.assert_shared_fetched_once(images)
    expect.fetched_once(
        seen.ghcr, images.app.single.blob_digests, context="ghcr.io, pulled first"
    )
    expect.fetched_once(
        seen.quay,
        images.tool.single.blob_digests - {images.shared},
        context="quay.io, the shared layer already cached",
    )
    seen.assert_hub_fetched_once(images.hub)
    # Docker Hub's token service saw only Docker Hub's account and names.
    hub_tokens = [t for t in seen.tokens if t.account]
    assert hub_tokens, "the mirror never asked Docker Hub's token service"
    assert {t.account for t in hub_tokens} == {registries.hub_account.username}
    assert all(
        scope.startswith("repository:library/")
        for token in hub_tokens
        for scope in token.scopes
    ), hub_tokens
    for reference in (images.ref(QUAY), images.ref(HUB)):
        await containerd.remove_image(reference)


async def test_podman_pulls_through_registries_conf_mirrors(
    registries: Registries, podman: Podman
) -> None:
    images = await registries.publish("podman")
    marks = registries.mark()

    # quay.io first this time: the shared layer comes from quay.io's upstream.
    await podman.pull(images.ref(QUAY))
    assert await podman.image_digest(images.ref(QUAY)) == images.tool.digest
    await podman.remove(images.ref(QUAY))  # and with it, the shared layer
    for registry, published in ((GHCR, images.app), (HUB, images.hub)):
        await podman.pull(images.ref(registry))
        assert await podman.image_digest(images.ref(registry)) == published.digest

    seen = await registries.since(marks)
    seen.assert_isolated()
    seen.assert_shared_fetched_once(images)
    expect.fetched_once(
        seen.quay, images.tool.single.blob_digests, context="quay.io, pulled first"
    )
    expect.fetched_once(
        seen.ghcr,
        images.app.single.blob_digests - {images.shared},
        context="ghcr.io, the shared layer already cached",
    )
    seen.assert_hub_fetched_once(images.hub)
    for registry in (GHCR, HUB):
        await podman.remove(images.ref(registry))


async def test_skopeo_copies_path_prefixed_names(
    registries: Registries,
    mirror: MirrorProcess,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    images = await registries.publish("skopeo")
    marks = registries.mark()

    copies = {}
    for registry, published in ((GHCR, images.app), (QUAY, images.tool)):
        reference = f"{registry}/{published.repository}:{published.tag}"
        got = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / registry)
        assert got.manifest_digest == published.digest
        assert_same_image(got, published, published.single)
        copies[registry] = got
    assert copies[GHCR].blobs[images.shared] == copies[QUAY].blobs[images.shared]
    # No prefix: Docker Hub, with library/ spelled out or not.
    hub = images.hub
    short = hub.repository.removeprefix("library/")
    got = await skopeo.pull_to_dir(mirror.host, f"{short}:1", tmp_path / HUB)
    assert got.manifest_digest == hub.digest
    assert_same_image(got, hub, hub.single)

    raw = await skopeo.inspect_raw(f"{mirror.host}/{images.ref(GHCR)}")
    assert raw.stdout.encode() == manifest_bytes(images.app)

    seen = await registries.since(marks)
    seen.assert_isolated()
    seen.assert_shared_fetched_once(images)
    expect.fetched_once(seen.ghcr, images.app.single.blob_digests, context="ghcr.io")
    expect.fetched_once(
        seen.quay, images.tool.single.blob_digests - {images.shared}, context="quay.io"
    )
    seen.assert_hub_fetched_once(hub)


async def test_dockerd_pulls_hub_by_mirror_and_others_by_path(
    registries: Registries,
    mirror: MirrorProcess,
    docker_factory: DockerFactory,
) -> None:
    docker = docker_factory(mirror)
    images = await registries.publish("dockerd")
    marks = registries.mark()
    async with DockerEngine(docker.socket_path) as engine:
        hub = images.hub
        await engine.pull(hub.repository, hub.tag)
        assert_image(
            await engine.inspect(f"{hub.repository}:{hub.tag}"), hub, hub.single
        )
        for registry, published in ((GHCR, images.app), (QUAY, images.tool)):
            name = f"{mirror.host}/{registry}/{published.repository}"
            await engine.pull(name, published.tag)
            info = await engine.inspect(f"{name}:{published.tag}")
            assert info is not None, f"{name} is not in dockerd"
            assert info["Id"] == published.single.config.digest
            assert f"{name}@{published.digest}" in info["RepoDigests"]
            assert info["RootFS"]["Layers"] == [
                layer.diff_id for layer in published.single.layers
            ]

    seen = await registries.since(marks)
    seen.assert_isolated()
    seen.assert_shared_fetched_once(images)
    expect.fetched_once(seen.ghcr, images.app.single.blob_digests, context="ghcr.io")
    seen.assert_hub_fetched_once(hub)


# --- routing, directly ------------------------------------------------------------


async def test_ns_selects_the_registry_and_is_echoed(
    registries: Registries, mirror: MirrorProcess, http: aiohttp.ClientSession
) -> None:
    images = await registries.publish("ns")
    for registry, published in (
        (GHCR, images.app),
        (QUAY, images.tool),
        (HUB, images.hub),
    ):
        url = f"{mirror.url}/v2/{published.repository}/manifests/{published.tag}"
        async with http.get(
            url, params={"ns": registry}, headers={"Accept": ACCEPT}
        ) as response:
            body = await response.read()
            assert response.status == 200, (registry, body)
            assert response.headers["OCI-Namespace"] == registry
            assert response.headers["Docker-Content-Digest"] == published.digest
        assert sha256_of(body) == published.digest


async def test_one_name_in_two_registries_is_two_images(
    registries: Registries, mirror: MirrorProcess, http: aiohttp.ClientSession
) -> None:
    """Tags are per registry: ``both/x:1`` on ghcr.io and on quay.io are
    different images, and each upstream is only asked for its own."""
    name = f"both/{unique('same-')}"
    pushed = dict(
        zip(
            (GHCR, QUAY),
            await asyncio.gather(
                registries.publisher.image(
                    name, layer_sizes=[1000], layer_seeds=["ghcr"], to=registries.ghcr
                ),
                registries.publisher.image(
                    name, layer_sizes=[1000], layer_seeds=["quay"], to=registries.quay
                ),
            ),
            strict=True,
        )
    )
    assert pushed[GHCR].digest != pushed[QUAY].digest
    marks = registries.mark()
    # Twice: the second round answers from the cache, still per registry.
    for _ in range(2):
        for registry, published in pushed.items():
            for url, params in (
                (f"{mirror.url}/v2/{registry}/{name}/manifests/1", {}),
                (f"{mirror.url}/v2/{name}/manifests/1", {"ns": registry}),
            ):
                async with http.get(
                    url, params=params, headers={"Accept": ACCEPT}
                ) as response:
                    assert response.status == 200, (url, await response.text())
                    digest = response.headers["Docker-Content-Digest"]
                assert digest == published.digest, (registry, url, params)
    seen = await registries.since(marks)
    seen.assert_isolated()
    for registry, log, other in (
        (GHCR, seen.ghcr, pushed[QUAY]),
        (QUAY, seen.quay, pushed[GHCR]),
    ):
        asked = {r.reference for r in log}
        assert other.digest not in asked, (
            f"{registry}'s upstream was asked for the other registry's manifest\n"
            f"{seen.describe()}"
        )
        assert any(r.repository == name for r in log), seen.describe()


async def test_unknown_ns_is_name_unknown(
    registries: Registries, mirror: MirrorProcess, http: aiohttp.ClientSession
) -> None:
    marks = registries.mark()
    url = f"{mirror.url}/v2/owner/app/manifests/1"
    async with http.get(
        url, params={"ns": "registry.example.org"}, headers={"Accept": ACCEPT}
    ) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        document = await response.json()
    errors = document["errors"]
    assert [error["code"] for error in errors] == ["NAME_UNKNOWN"], document
    assert "registry.example.org" in json.dumps(errors), document
    assert set(errors[0]) >= {"code", "message", "detail"}
    seen = await registries.since(marks)
    upstream_requests = [*seen.ghcr, *seen.quay, *seen.hub.requests]
    assert not upstream_requests, seen.describe()


async def test_cosign_signature_tag_and_referrers(
    registries: Registries,
    mirror: MirrorProcess,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    app = (await registries.publish("sig")).app
    signature = build_signature(
        tmp_path / "signature",
        signed=app.single.manifest,
        reference=f"{GHCR}/{app.repository}",
    )
    assert signature.tag == f"sha256-{app.digest.removeprefix('sha256:')}.sig"
    tag = signature.tag
    await registries.ghcr.push(signature, app.repository, tag)
    signed = Published(app.repository, tag, signature)
    expected = manifest_bytes(signed)

    raw = await skopeo.inspect_raw(f"{mirror.host}/{GHCR}/{signed.repository}:{tag}")
    assert raw.stdout.encode() == expected
    url = f"{mirror.url}/v2/{app.repository}/manifests/{tag}"
    async with http.get(
        url, params={"ns": GHCR}, headers={"Accept": ACCEPT}
    ) as response:
        assert response.status == 200
        assert await response.read() == expected
        assert response.headers["Docker-Content-Digest"] == signed.digest
        assert response.content_type == MEDIA_TYPES["oci"]["manifest"]

    # Referrers: whatever the upstream answers, relayed. Debian's distribution
    # 2.8 predates the API, so both say 404 there (the mirror with an OCI
    # error body of its own; distribution's is plain text).
    auth = aiohttp.encode_basic_auth(*registries.ghcr.credentials or ("", ""))
    path = f"{app.repository}/referrers/{app.digest}"
    async with http.get(
        f"{registries.ghcr.url}/v2/{path}", headers={"Authorization": auth}
    ) as response:
        upstream_status, upstream_body = response.status, await response.read()
    marks = registries.mark()
    # Both ways of naming the registry: a path prefix, and containerd's ns.
    for url, params in (
        (f"{mirror.url}/v2/{GHCR}/{path}", {}),
        (f"{mirror.url}/v2/{path}", {"ns": GHCR}),
    ):
        async with http.get(url, params=params) as response:
            status, body = response.status, await response.read()
        assert status == upstream_status, (url, status, body, upstream_body)
        if upstream_status == 200:
            assert json.loads(body) == json.loads(upstream_body)
    seen = await registries.since(marks)
    seen.assert_isolated()
    # Asked once: the answer (404 here) is cached like a tag.
    relayed = [r for r in seen.ghcr if r.path == f"/v2/{path}" and r.method == "GET"]
    asked = f"the mirror asked ghcr.io {len(relayed)} times\n{seen.describe()}"
    assert len(relayed) == 1, asked


# --- one registry down -------------------------------------------------------------


async def test_one_registry_down_leaves_the_others_pulling(
    registries: Registries,
    mirror: MirrorProcess,
    containerd: Containerd,
    http: aiohttp.ClientSession,
) -> None:
    images = await registries.publish("down")
    registries.quay.stop()
    try:
        for registry, published in ((GHCR, images.app), (HUB, images.hub)):
            await containerd.pull(images.ref(registry))
            pulled = await containerd.image_digests()
            assert pulled[images.ref(registry)] == published.digest

        tool = images.tool
        url = f"{mirror.url}/v2/{QUAY}/{tool.repository}/manifests/{tool.tag}"
        started = time.monotonic()
        async with http.get(url, headers={"Accept": ACCEPT}) as response:
            assert response.status == 503, await response.text()
            document = await response.json()
        assert time.monotonic() - started < PROMPT
        assert [e["code"] for e in document["errors"]] == ["UNAVAILABLE"], document

        started = time.monotonic()
        failed = await containerd.pull(images.ref(QUAY), check=False, time_limit=60)
        elapsed = time.monotonic() - started
        assert failed.returncode != 0, failed.describe()
        assert "503" in failed.stderr, failed.describe()
        assert elapsed < PROMPT * 2, f"ctr took {elapsed:.1f}s to fail"
        for registry in (GHCR, HUB):
            await containerd.remove_image(images.ref(registry))
    finally:
        start_or_fail(lambda: registries.quay.start(same_port=True))


async def test_no_upstream_ever_saw_another_registrys_repository(
    registries: Registries,
) -> None:
    """Over the whole module: every upstream saw its own repositories (the
    tests above ran) and nothing else."""
    seen = await registries.since(Marks(ghcr=0, quay=0, hub=0, tokens=0))
    seen.assert_isolated()
    for registry, log in ((GHCR, seen.ghcr), (QUAY, seen.quay)):
        assert log.repositories(), f"{registry}'s upstream saw no repository"
    assert any(r.named for r in seen.hub.registry), "docker.io's edge saw nothing"
    # ghcr.io's account never failed a check: no wrong credentials were sent.
    assert registries.ghcr.process is not None
    assert "error authenticating user" not in registries.ghcr.process.log_text(
        limit=None
    )
    # Docker Hub's token service never saw ghcr.io's account.
    accounts = {t.account for t in registries.token_server.requests}
    assert registries.ghcr_account.username not in accounts
