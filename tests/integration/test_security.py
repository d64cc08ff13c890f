"""Passwords, repository policy and the admin listener with real clients.

One module-scoped ``mirror serve`` (named like conftest's ``mirror``, which
it overrides here, so its log comes with failing tests) stands in front of
the session's registry and serves HTTPS with a test CA's certificate for
127.0.0.1, as in test_tls.py. It also:

* requires HTTP Basic credentials on ``/v2/`` (``[auth] htpasswd``: one
  bcrypt user, cost 4), so its ``/v2/`` answers 401 once it serves and the
  readiness probe waits for that;
* denies ``library/denied*`` on its Docker Hub registry (``[upstream] deny``;
  the session registry is ``[upstream]``, i.e. docker.io, so names are in
  ``library/...`` form);
* serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``admin_listen``
  (another loopback port) instead of the registry port.

Each client is given the password the way it is in production: skopeo
``--src-creds``, containerd a ``header`` table in the mirror's ``[host]`` of
hosts.toml, podman an ``auth.json`` entry for the mirror's host:port
(``--authfile``). Every client also pulls without them and must fail.

The mirror throttles an address after 10 refused logins within a minute,
and every client here is 127.0.0.1: the module makes only a few refused
logins (wrong passwords; a request without credentials is not refused, it
is "missing"), well under that.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.tls import CertificateAuthority, TlsFiles

from . import expect
from .conftest import (
    DockerFactory,
    Publisher,
    running_containerd,
    start_or_fail,
    unique,
    watch_log,
)
from .daemon_dirs import make_daemon_dir, remove_daemon_dir
from .docker_daemon import API, DockerEngine
from .mirror_process import MirrorProcess, toml_string
from .podman import Podman
from .skopeo import Skopeo, write_cert_dir
from .test_skopeo import assert_same_image
from .tools import free_port, require_tool
from .upstream import Upstream

USER = "ci"
PASSWORD = "s3cret-for-the-mirror"
DENY = "library/denied*"


@dataclass(frozen=True)
class Setup:
    """The module's certificate, password file and admin address."""

    tls: TlsFiles
    htpasswd: Path
    admin_port: int
    workdir: Path

    def cert_dir(self, name: str) -> Path:
        """A containers/image cert directory trusting the test CA."""
        return write_cert_dir(self.workdir / name, self.tls.ca_file)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def codes(self) -> list[str]:
        """The OCI error codes of the body."""
        return [error["code"] for error in self.json()["errors"]]


def basic(user: str, password: str) -> str:
    """The base64 of ``user:password``, as Basic credentials carry it."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    workdir = tmp_path_factory.mktemp("security")
    ca = CertificateAuthority("mirror security test CA")
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{hashed}\n")
    return Setup(
        tls=TlsFiles.write(ca.issue(("127.0.0.1",)), workdir / "server"),
        htpasswd=htpasswd,
        admin_port=free_port(),
        workdir=workdir,
    )


@pytest.fixture(scope="module")
def mirror(
    upstream: Upstream, setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MirrorProcess]:
    """The HTTPS mirror requiring a password, denying ``DENY``, with an
    admin listener."""
    process = MirrorProcess(
        upstream_url=upstream.url,
        workdir=tmp_path_factory.mktemp("security-mirror"),
        tls=setup.tls,
        server_toml=f"admin_listen = {toml_string(f'127.0.0.1:{setup.admin_port}')}\n",
        upstream_toml=f"deny = [{toml_string(DENY)}]\n",
        extra_toml=f"\n[auth]\nhtpasswd = {toml_string(str(setup.htpasswd))}\n",
        ready_status=401,
    )
    try:
        start_or_fail(process.start)
        yield process
    finally:
        process.stop()


# --- helpers --------------------------------------------------------------------


async def get(
    mirror: MirrorProcess,
    path: str,
    *,
    auth: tuple[str, str] | None = None,
    base: str | None = None,
) -> Answer:
    """GET ``path`` from the mirror's registry port (or ``base``), over a
    new connection, as ``auth`` (user, password) if given."""
    connector = aiohttp.TCPConnector(ssl=mirror.client_context(), force_close=True)
    headers = {} if auth is None else {"Authorization": f"Basic {basic(*auth)}"}
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=15)
        ) as http,
        http.get(f"{base or mirror.url}{path}", headers=headers) as response,
    ):
        return Answer(response.status, dict(response.headers), await response.read())


async def metric(setup: Setup, mirror: MirrorProcess, family: str) -> dict[str, float]:
    """``<family>_total`` by its one label's value, from the admin port's
    ``/metrics`` (asked without credentials)."""
    answer = await get(mirror, "/metrics", base=setup.admin_url)
    assert answer.status == 200, answer
    return {
        next(iter(sample.labels.values()), ""): sample.value
        for parsed in text_string_to_metric_families(answer.body.decode())
        if parsed.name == family
        for sample in parsed.samples
        if sample.name == f"{family}_total"
    }


async def logins(setup: Setup, mirror: MirrorProcess) -> dict[str, float]:
    """``mirror_client_auth_total`` by result."""
    return await metric(setup, mirror, "mirror_client_auth")


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def assert_challenge(answer: Answer) -> None:
    """A 401 asking for Basic credentials, with an OCI UNAUTHORIZED body."""
    assert answer.status == 401, answer
    assert answer.headers.get("WWW-Authenticate") == 'Basic realm="mirror"', answer
    assert answer.codes() == ["UNAUTHORIZED"], answer


# --- skopeo ---------------------------------------------------------------------


async def test_skopeo_copies_with_credentials_and_is_refused_without(
    mirror: MirrorProcess,
    setup: Setup,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    assert mirror.url.startswith("https://")
    published = await publish.image(
        unique("library/auth-skopeo-"), layer_sizes=[300_000, 500_000]
    )
    reference = f"{published.repository}:{published.tag}"
    cert_dir = setup.cert_dir("skopeo")
    before = await logins(setup, mirror)
    mark = upstream.mark()

    # No credentials, a wrong password, a user not in the file: each gets
    # the Basic challenge, and the mirror asks upstream nothing.
    assert_challenge(await get(mirror, "/v2/"))
    assert_challenge(await get(mirror, "/v2/", auth=(USER, "wrong")))
    assert_challenge(await get(mirror, "/v2/", auth=("nobody", PASSWORD)))
    assert_challenge(await get(mirror, f"/v2/{published.repository}/manifests/1"))
    after = await logins(setup, mirror)
    assert delta(after, before, "rejected") == 2, (before, after)
    assert delta(after, before, "missing") == 2, (before, after)

    refused = await skopeo.inspect_raw(
        f"{mirror.host}/{reference}", check=False, cert_dir=cert_dir, time_limit=30
    )
    assert refused.returncode != 0, refused.describe()
    assert "unauthorized" in refused.stderr.lower(), refused.describe()
    refused_requests = await upstream.requests_since(mark)
    assert not refused_requests.requests, (
        "a client without credentials made the mirror ask upstream\n"
        f"{refused_requests.describe()}"
    )

    got = await skopeo.pull_to_dir(
        mirror.host,
        reference,
        tmp_path / "copy",
        cert_dir=cert_dir,
        credentials=(USER, PASSWORD),
    )
    assert got.manifest_digest == published.digest
    assert_same_image(got, published, published.single)
    expect.fetched_once(
        await upstream.requests_since(mark),
        published.single.blob_digests,
        context="skopeo with credentials",
    )
    # One bcrypt check, then the remembered login for the rest of the pull.
    final = await logins(setup, mirror)
    assert delta(final, after, "verified") == 1, (after, final)
    assert delta(final, after, "cached") >= 1, (after, final)
    assert delta(final, after, "rejected") == 0, (after, final)


# --- containerd -----------------------------------------------------------------


async def test_containerd_sends_the_authorization_header_from_hosts_toml(
    containerd_bin: str,
    ctr_bin: str,
    mirror: MirrorProcess,
    setup: Setup,
    upstream: Upstream,
    publish: Publisher,
    request: pytest.FixtureRequest,
) -> None:
    published = await publish.multiarch(unique("library/auth-ctr-"), flavour="docker")
    amd64 = published.multi.for_platform("linux", "amd64")
    ref = f"docker.io/{published.repository}:{published.tag}"
    headers = {"authorization": f"Basic {basic(USER, PASSWORD)}"}
    with running_containerd(
        containerd_bin, ctr_bin, mirror.url, ca_file=setup.tls.ca_file, headers=headers
    ) as daemon:
        watch_log(request, "containerd", daemon.process)
        hosts = (daemon.hosts_dir / "docker.io" / "hosts.toml").read_text()
        assert f'[host."{mirror.url}".header]' in hosts, hosts
        assert "authorization = " in hosts, hosts
        mark = upstream.mark()

        anonymous = daemon.write_hosts("hosts-no-auth", ca=setup.tls.ca_file)
        refused = await daemon.pull(ref, hosts_dir=anonymous, check=False)
        assert refused.returncode != 0, refused.describe()
        assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower(), (
            refused.describe()
        )
        assert ref not in await daemon.image_digests()
        refused_requests = await upstream.requests_since(mark)
        assert not refused_requests.requests, refused_requests.describe()

        await daemon.pull(ref)
        assert (await daemon.image_digests())[ref] == published.digest
        assert {amd64.digest, *amd64.blob_digests} <= await daemon.content_digests()
        expect.fetched_once(
            await upstream.requests_since(mark),
            amd64.blob_digests,
            context="ctr pull with an authorization header",
        )


# --- podman ---------------------------------------------------------------------


async def test_podman_pulls_with_an_authfile_and_is_refused_without(
    mirror: MirrorProcess, setup: Setup, upstream: Upstream, publish: Publisher
) -> None:
    binary = require_tool("podman")
    podman = Podman(
        binary=binary,
        directory=make_daemon_dir(),
        mirrors={"docker.io": mirror.host},
        insecure=False,
        cert_dir=setup.cert_dir("podman"),
    )
    try:
        authfile = podman.directory / "mirror-auth.json"
        authfile.write_text(
            json.dumps({"auths": {mirror.host: {"auth": basic(USER, PASSWORD)}}})
        )
        published = await publish.image(
            unique("library/auth-podman-"), layer_sizes=[200_000, 400_000]
        )
        ref = f"docker.io/{published.repository}:{published.tag}"
        mark = upstream.mark()

        # Its default auth.json holds no credentials.
        refused = await podman.pull(ref, check=False)
        assert refused.returncode != 0, refused.describe()
        assert "unauthorized" in refused.stderr.lower(), refused.describe()
        refused_requests = await upstream.requests_since(mark)
        assert not refused_requests.requests, refused_requests.describe()

        await podman.pull(ref, authfile=authfile)
        assert await podman.image_digest(ref) == published.digest
        expect.fetched_once(
            await upstream.requests_since(mark),
            published.single.blob_digests,
            context="podman with an authfile",
        )
        await podman.remove(ref)
    finally:
        podman.close()
        remove_daemon_dir(podman.directory)


# --- repository policy ----------------------------------------------------------


async def test_a_denied_repository_gets_403_and_upstream_is_never_asked(
    mirror: MirrorProcess,
    setup: Setup,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    # The image exists upstream: a refusal is the policy's, not a 404.
    published = await publish.image(unique("library/denied-"), layer_sizes=[100_000])
    repository = published.repository
    layer = published.single.layers[0].digest
    denials_before = await metric(setup, mirror, "mirror_repository_denials")
    mark = upstream.mark()

    account = (USER, PASSWORD)
    for path in (
        f"/v2/{repository}/manifests/{published.tag}",
        f"/v2/{repository}/manifests/{published.digest}",
        f"/v2/{repository}/blobs/{layer}",
        f"/v2/{repository}/tags/list",
    ):
        answer = await get(mirror, path, auth=account)
        assert answer.status == 403, (path, answer)
        assert answer.codes() == ["DENIED"], (path, answer)
    # Without credentials it is still a login question first.
    assert_challenge(await get(mirror, f"/v2/{repository}/manifests/1"))

    refused = await skopeo.copy(
        "--quiet",
        "--src-tls-verify=true",
        "--src-cert-dir",
        setup.cert_dir("skopeo-denied"),
        "--src-creds",
        f"{USER}:{PASSWORD}",
        f"docker://{mirror.host}/{repository}:{published.tag}",
        f"dir:{tmp_path / 'copy'}",
        check=False,
        time_limit=30,
    )
    assert refused.returncode != 0, refused.describe()
    assert "denied" in refused.stderr.lower(), refused.describe()

    log = await upstream.requests_since(mark)
    asked = {name for name in log.repositories() if name.startswith("library/denied")}
    assert not asked, f"upstream was asked for {asked}\n{log.describe()}"
    denials = await metric(setup, mirror, "mirror_repository_denials")
    assert delta(denials, denials_before, "docker.io") >= 4, (denials_before, denials)


# --- admin listener -------------------------------------------------------------


async def test_metrics_move_to_the_admin_port_and_count_refused_logins(
    mirror: MirrorProcess, setup: Setup
) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        answer = await get(mirror, path, base=setup.admin_url)
        assert answer.status == 200, (path, answer)
    # The registry port answers them 404, with or without a login.
    for auth in (None, (USER, PASSWORD)):
        answer = await get(mirror, "/metrics", auth=auth)
        assert answer.status == 404, (auth, answer)
        assert b"mirror_client_auth" not in answer.body
    # The admin port serves nothing but them.
    assert (await get(mirror, "/v2/", base=setup.admin_url)).status != 200

    before = await logins(setup, mirror)
    for password in ("wrong-1", "wrong-2", "wrong-3"):
        assert_challenge(await get(mirror, "/v2/", auth=(USER, password)))
    after = await logins(setup, mirror)
    assert delta(after, before, "rejected") == 3, (before, after)
    assert after.get("throttled", 0.0) == 0.0, after


# --- docker login ---------------------------------------------------------------


async def test_docker_login_and_a_pull_by_the_mirrors_name_use_its_password(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    docker_factory: DockerFactory,
) -> None:
    """`docker login mirror:port` (the Engine's POST /auth) checks the
    password against the mirror's Basic challenge, and a pull of
    `mirror:port/<name>` sends it (X-Registry-Auth, as the CLI does).
    dockerd treats 127.0.0.0/8 as an insecure registry, so it does not
    verify the mirror's certificate here (see test_tls.py)."""
    published = await publish.image(
        unique("library/auth-docker-"), layer_sizes=[200_000]
    )
    daemon = docker_factory(mirror)
    mark = upstream.mark()

    def auth(password: str) -> dict[str, str]:
        return {"username": USER, "password": password, "serveraddress": mirror.host}

    async with DockerEngine(daemon.socket_path) as engine:
        async with engine.session.post(f"{API}/auth", json=auth(PASSWORD)) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["Status"] == "Login Succeeded"
        async with engine.session.post(f"{API}/auth", json=auth("wrong")) as resp:
            assert resp.status != 200, await resp.read()

        image = f"{mirror.host}/{published.repository}"
        params = {"fromImage": image, "tag": published.tag}
        status, refused = await pull_messages(engine, params, None)
        assert status != 200 or any("error" in m for m in refused), refused
        assert len(upstream.requests_now(mark)) == 0
        header = base64.urlsafe_b64encode(json.dumps(auth(PASSWORD)).encode()).decode()
        status, pulled = await pull_messages(engine, params, header)
        assert status == 200, pulled
        assert not [m for m in pulled if "error" in m], pulled
        found = await engine.inspect(f"{image}:{published.tag}")
        assert found is not None
        assert f"{image}@{published.digest}" in found["RepoDigests"]


async def pull_messages(
    engine: DockerEngine, params: dict[str, str], registry_auth: str | None
) -> tuple[int, list[dict[str, Any]]]:
    """POST /images/create: its status and the messages it streamed."""
    headers = {} if registry_auth is None else {"X-Registry-Auth": registry_auth}
    async with engine.session.post(
        f"{API}/images/create", params=params, headers=headers
    ) as resp:
        body = await resp.read()
    lines = body.decode().splitlines()
    return resp.status, [json.loads(line) for line in lines if line.strip()]
