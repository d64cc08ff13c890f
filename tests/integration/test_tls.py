"""HTTPS on the listener with real clients and a real `mirror serve` process.

Two module-scoped mirrors stand in front of the session's registry, both
serving a certificate for 127.0.0.1 issued by a test CA (tests/fakes/tls.py):
``mirror`` (named like conftest's, which it overrides here, so its log comes
with failing tests) serves anyone, ``mtls_mirror`` requires client
certificates issued by a second CA (``server.client_ca``). Each client is
told to trust the test CA the way it is in production:

* skopeo and podman: a containers/image cert directory holding ``ca.crt``
  (and ``client.cert`` + ``client.key`` for mTLS), given as skopeo's
  ``--src-cert-dir`` / podman's ``--cert-dir``; podman's registries.conf
  mirror is not ``insecure``, so it verifies.
* containerd: ``ca = "<path>"`` (and ``client = [[cert, key]]``) in the
  mirror's ``[host]`` of hosts.toml.
* dockerd: ``registry-mirrors = https://127.0.0.1:PORT``. dockerd would read
  ``/etc/docker/certs.d/127.0.0.1:PORT/ca.crt``, but only for a registry it
  considers secure, and it always adds 127.0.0.0/8 to its insecure
  registries (registry/config.go, LoadInsecureRegistries: "Localhost is by
  default considered as an insecure registry"); for those, newTLSConfig sets
  InsecureSkipVerify and reads no certs.d at all. There is no flag or
  config key for another certs.d either. So dockerd speaks TLS to the
  loopback mirror without verifying it, and this module writes nothing to
  /etc/docker: a ca.crt there would be ignored and prove nothing. The
  dockerd test proves the daemon pulls through an HTTPS-only listener.

The last test runs its own mirror watching its certificate files every
200 ms, replaces them while a large blob download is open, and then sends
SIGHUP with a key that does not match: the open download finishes with the
first certificate, new connections get the second, and the failed reload
keeps it and is counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohappyeyeballs import AddrInfoType
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.tls import CertificateAuthority, ServerCertificate, TlsFiles

from . import expect
from .conftest import (
    DockerFactory,
    Publisher,
    running_containerd,
    start_or_fail,
    unique,
    watch_log,
)
from .containerd_daemon import Containerd
from .daemon_dirs import make_daemon_dir, remove_daemon_dir
from .mirror_process import MirrorProcess
from .podman import Podman
from .skopeo import Skopeo, sha256_of, write_cert_dir
from .test_dockerd import pull_remove_repull
from .test_skopeo import assert_same_image
from .tools import require_tool
from .upstream import Upstream

MiB = 1 << 20
SERVER_HOSTS = ("127.0.0.1",)
# How often the rotating mirror looks at its certificate files.
WATCH = 0.2
# Bound on "a client without a certificate the mirror accepts gives up".
PROMPT = 15.0
# How a Go client reports a handshake the server refused.
# How Go reports the mirror aborting a handshake it refused. With TLS 1.3
# Go has finished its side, so it sees the close as a reset, an EOF, or, when
# the close comes before its request is read, net/http's "server closed idle
# connection" (its name for an EOF on a connection with no response yet).
REFUSALS = (
    "connection reset by peer",
    "EOF",
    "certificate",
    "server closed idle connection",
)


@dataclass(frozen=True)
class Pki:
    """The module's certificates, as files."""

    ca: CertificateAuthority
    """Issues the mirrors' server certificates."""
    server: TlsFiles
    """The mirrors' certificate for 127.0.0.1, its key, and the CA file."""
    client_ca: Path
    """What ``mtls_mirror`` accepts client certificates from."""
    node: tuple[Path, Path]
    """A client certificate and key ``client_ca`` issued."""
    stranger: tuple[Path, Path]
    """A client certificate and key from a CA the mirror does not trust."""
    workdir: Path

    def cert_dir(self, name: str, client: tuple[Path, Path] | None = None) -> Path:
        """A containers/image cert directory trusting the CA (``ca.crt``),
        presenting ``client`` if given."""
        return write_cert_dir(self.workdir / name, self.server.ca_file, client)


def write_client(certificate: ServerCertificate, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "client.crt", directory / "client.key"
    cert.write_bytes(certificate.certificate_pem)
    key.touch(mode=0o600)
    key.write_bytes(certificate.key_pem)
    return cert, key


def der(certificate: ServerCertificate) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certificate.certificate_pem.decode())


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    workdir = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority("mirror TLS test CA")
    clients = CertificateAuthority("mirror TLS test client CA")
    return Pki(
        ca=ca,
        server=TlsFiles.write(ca.issue(SERVER_HOSTS), workdir / "server"),
        client_ca=clients.write(workdir / "client-ca.pem"),
        node=write_client(clients.issue(["node-1"], client=True), workdir / "node"),
        stranger=write_client(
            CertificateAuthority("stranger CA").issue(["node-2"], client=True),
            workdir / "stranger",
        ),
        workdir=workdir,
    )


@pytest.fixture(scope="module")
def mirror(
    upstream: Upstream, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MirrorProcess]:
    """The HTTPS mirror in front of ``upstream``; anyone may connect."""
    process = MirrorProcess(
        upstream_url=upstream.url,
        workdir=tmp_path_factory.mktemp("tls-mirror"),
        tls=pki.server,
    )
    try:
        start_or_fail(process.start)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def mtls_mirror(
    upstream: Upstream, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MirrorProcess]:
    """An HTTPS mirror requiring client certificates from ``pki.client_ca``;
    its readiness probe presents ``pki.node``."""
    process = MirrorProcess(
        upstream_url=upstream.url,
        workdir=tmp_path_factory.mktemp("mtls-mirror"),
        tls=pki.server,
        client_ca=pki.client_ca,
        client_cert=pki.node,
    )
    try:
        start_or_fail(process.start)
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def _mtls_log(request: pytest.FixtureRequest) -> None:
    """Attach the mTLS mirror's log to failing tests that use it."""
    if "mtls_mirror" in request.fixturenames:
        mtls: MirrorProcess = request.getfixturevalue("mtls_mirror")
        watch_log(request, "mtls mirror", mtls.process)


@pytest.fixture(scope="module")
def containerd(
    containerd_bin: str, ctr_bin: str, mirror: MirrorProcess, pki: Pki
) -> Iterator[Containerd]:
    """containerd whose hosts.toml names the HTTPS mirror and its CA."""
    with running_containerd(
        containerd_bin, ctr_bin, mirror.url, ca_file=pki.server.ca_file
    ) as daemon:
        yield daemon


# --- helpers --------------------------------------------------------------------


async def peer_certificate(mirror: MirrorProcess, context: ssl.SSLContext) -> bytes:
    """The DER certificate a new TLS connection to ``mirror`` is given."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", mirror.port, ssl=context
    )
    try:
        got = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert got is not None
        return bytes(got)
    finally:
        writer.close()
        await writer.wait_closed()


async def tls_reloads(mirror: MirrorProcess) -> dict[str, float]:
    """``mirror_tls_reloads_total`` by result, from ``/metrics`` over a new
    HTTPS connection (a result never counted is missing)."""
    connector = aiohttp.TCPConnector(ssl=mirror.client_context(), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{mirror.url}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mirror_tls_reloads"
        for sample in family.samples
        if sample.name == "mirror_tls_reloads_total"
    }


async def until_reloads(
    mirror: MirrorProcess, result: str, count: float, *, within: float = 5.0
) -> dict[str, float]:
    """Poll ``/metrics`` until ``result`` reloads reach ``count``."""
    deadline = time.monotonic() + within
    while True:
        reloads = await tls_reloads(mirror)
        if reloads.get(result, 0) >= count or time.monotonic() > deadline:
            return reloads
        await asyncio.sleep(0.05)


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` next to ``path`` and rename it over it, as ACME clients
    and cert-manager's volumes do: a reader sees the old file or the new."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.replace(new, path)


def rewrite_unnoticed(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place with ``data`` (of the same length) and put
    its modification time back, so inode, mtime and size (what the watcher
    compares) stay as they were."""
    before = path.stat()
    assert len(data) == before.st_size, "the new content must be as long"
    with path.open("r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    """A client socket with a small fixed receive buffer (no autotuning),
    so a paused download keeps the mirror waiting to send the rest."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


# --- clients over HTTPS ---------------------------------------------------------


async def test_skopeo_copies_over_https_trusting_the_ca_in_its_cert_dir(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    pki: Pki,
    tmp_path: Path,
) -> None:
    assert mirror.url.startswith("https://")
    published = await publish.image(
        unique("library/tls-skopeo-"), layer_sizes=[300_000, MiB]
    )
    reference = f"{published.repository}:{published.tag}"

    # Without the CA the certificate is one skopeo cannot verify.
    untrusting = tmp_path / "no-ca"
    untrusting.mkdir()
    refused = await skopeo.inspect_raw(
        f"{mirror.host}/{reference}", check=False, cert_dir=untrusting, time_limit=30
    )
    assert refused.returncode != 0, refused.describe()
    assert "x509" in refused.stderr, refused.describe()

    mark = upstream.mark()
    got = await skopeo.pull_to_dir(
        mirror.host, reference, tmp_path / "copy", cert_dir=pki.cert_dir("skopeo")
    )
    assert got.manifest_digest == published.digest
    assert_same_image(got, published, published.single)
    expect.fetched_once(
        await upstream.requests_since(mark),
        published.single.blob_digests,
        context="skopeo over HTTPS",
    )


async def test_containerd_pulls_through_the_https_mirror_with_ca_in_hosts_toml(
    containerd: Containerd, upstream: Upstream, publish: Publisher
) -> None:
    hosts = (containerd.hosts_dir / "docker.io" / "hosts.toml").read_text()
    assert 'ca = "' in hosts
    assert "https://127.0.0.1:" in hosts
    published = await publish.multiarch(unique("library/tls-ctr-"), flavour="docker")
    amd64 = published.multi.for_platform("linux", "amd64")
    ref = f"docker.io/{published.repository}:{published.tag}"

    mark = upstream.mark()
    # Without `ca` ctr cannot verify the mirror, and its fallback (the
    # closed port) fails too.
    refused = await containerd.pull(
        ref, hosts_dir=containerd.write_hosts("hosts-no-ca"), check=False
    )
    assert refused.returncode != 0, refused.describe()
    assert "x509" in refused.stderr, refused.describe()
    await containerd.pull(ref)
    assert (await containerd.image_digests())[ref] == published.digest
    assert {amd64.digest, *amd64.blob_digests} <= await containerd.content_digests()
    expect.fetched_once(
        await upstream.requests_since(mark),
        amd64.blob_digests,
        context="ctr pull over HTTPS",
    )
    await containerd.remove_image(ref)


async def test_dockerd_pulls_through_the_https_mirror(
    mirror: MirrorProcess,
    docker_factory: DockerFactory,
    upstream: Upstream,
    publish: Publisher,
) -> None:
    # registry-mirrors = https://127.0.0.1:PORT. dockerd does not verify a
    # mirror on 127.0.0.0/8 (see the module docstring): no certs.d is
    # written, and the pull succeeds without dockerd ever being given the CA.
    certs_d = f"/etc/docker/certs.d/{mirror.host}"
    assert not await asyncio.to_thread(os.path.exists, certs_d)
    docker = docker_factory(mirror)
    assert docker.mirror_url.startswith("https://")
    published = await publish.image(
        unique("library/tls-docker-"), flavour="docker", layer_sizes=[200_000, MiB]
    )
    await pull_remove_repull(docker, upstream, published, published.single, tag="1")


async def test_podman_pulls_through_the_https_mirror_with_cert_dir(
    mirror: MirrorProcess, upstream: Upstream, publish: Publisher, pki: Pki
) -> None:
    binary = require_tool("podman")
    podman = Podman(
        binary=binary,
        directory=make_daemon_dir(),
        mirrors={"docker.io": mirror.host},
        insecure=False,
        cert_dir=pki.cert_dir("podman"),
    )
    try:
        published = await publish.image(
            unique("library/tls-podman-"), layer_sizes=[200_000, 400_000]
        )
        ref = f"docker.io/{published.repository}:{published.tag}"
        mark = upstream.mark()
        # With a cert dir lacking the CA, podman does not trust the mirror.
        empty = podman.directory / "no-ca"
        empty.mkdir()
        refused = await podman.pull(ref, check=False, cert_dir=empty)
        assert refused.returncode != 0, refused.describe()
        assert "x509" in refused.stderr, refused.describe()
        await podman.pull(ref)
        assert await podman.image_digest(ref) == published.digest
        expect.fetched_once(
            await upstream.requests_since(mark),
            published.single.blob_digests,
            context="podman over HTTPS",
        )
        await podman.remove(ref)
    finally:
        podman.close()
        remove_daemon_dir(podman.directory)


# --- client certificates --------------------------------------------------------


async def test_mtls_skopeo_needs_a_client_certificate_from_the_client_ca(
    mtls_mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    pki: Pki,
    tmp_path: Path,
) -> None:
    published = await publish.image(
        unique("library/mtls-skopeo-"), layer_sizes=[300_000, 500_000]
    )
    reference = f"{mtls_mirror.host}/{published.repository}:{published.tag}"
    mark = upstream.mark()
    for name, client in (("anonymous", None), ("stranger", pki.stranger)):
        started = time.monotonic()
        refused = await skopeo.inspect_raw(
            reference,
            check=False,
            cert_dir=pki.cert_dir(f"mtls-{name}", client),
            time_limit=PROMPT * 2,
        )
        elapsed = time.monotonic() - started
        assert refused.returncode != 0, f"{name}: {refused.describe()}"
        assert elapsed < PROMPT, f"{name}: skopeo took {elapsed:.1f}s to fail"
        # Refused at its first contact (the /v2/ ping), not by an HTTP
        # answer. With TLS 1.3 the client's side of the handshake is done
        # before the mirror checks its certificate, and asyncio drops the
        # mirror's alert when the handshake fails (sslproto sends nothing
        # after an SSLError and aborts), so Go sees a reset or an EOF rather
        # than "tls: certificate required".
        assert "pinging container registry" in refused.stderr, refused.describe()
        assert any(sign in refused.stderr for sign in REFUSALS), refused.describe()
    refused_requests = await upstream.requests_since(mark)
    assert not refused_requests.requests, (
        "a client refused at the handshake made the mirror ask upstream\n"
        f"{refused_requests.describe()}"
    )

    got = await skopeo.pull_to_dir(
        mtls_mirror.host,
        f"{published.repository}:{published.tag}",
        tmp_path / "copy",
        cert_dir=pki.cert_dir("mtls-node", pki.node),
    )
    assert got.manifest_digest == published.digest
    assert_same_image(got, published, published.single)
    expect.fetched_once(
        await upstream.requests_since(mark),
        published.single.blob_digests,
        context="skopeo with a client certificate",
    )


async def test_mtls_containerd_presents_the_client_certificate_from_hosts_toml(
    containerd_bin: str,
    ctr_bin: str,
    mtls_mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    pki: Pki,
    request: pytest.FixtureRequest,
) -> None:
    published = await publish.image(
        unique("library/mtls-ctr-"), layer_sizes=[300_000, 500_000]
    )
    ref = f"docker.io/{published.repository}:{published.tag}"
    with running_containerd(
        containerd_bin,
        ctr_bin,
        mtls_mirror.url,
        ca_file=pki.server.ca_file,
        client_cert=pki.node,
    ) as daemon:
        watch_log(request, "mtls containerd", daemon.process)
        hosts = (daemon.hosts_dir / "docker.io" / "hosts.toml").read_text()
        assert "client = [[" in hosts
        mark = upstream.mark()
        anonymous = daemon.write_hosts("hosts-no-client", ca=pki.server.ca_file)
        refused = await daemon.pull(ref, hosts_dir=anonymous, check=False)
        assert refused.returncode != 0, refused.describe()
        await daemon.pull(ref)
        assert (await daemon.image_digests())[ref] == published.digest
        assert published.single.blob_digests <= await daemon.content_digests()
        expect.fetched_once(
            await upstream.requests_since(mark),
            published.single.blob_digests,
            context="ctr pull with a client certificate",
        )


# --- rotation -------------------------------------------------------------------


async def test_rotation_spares_an_open_download_and_a_bad_sighup_keeps_the_cert(
    upstream: Upstream,
    publish: Publisher,
    pki: Pki,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    first, second = pki.ca.issue(SERVER_HOSTS), pki.ca.issue(SERVER_HOSTS)
    files = TlsFiles.write(first, tmp_path / "tls")
    size = 24 * MiB
    published = await publish.image(unique("library/tls-rotate-"), layer_sizes=[size])
    layer = published.single.layers[0]
    mirror = MirrorProcess(
        upstream_url=upstream.url,
        workdir=tmp_path / "mirror",
        tls=files,
        server_toml=f'tls_watch_interval = "{int(WATCH * 1000)}ms"\n',
    )
    try:
        start_or_fail(mirror.start)
        watch_log(request, "rotating mirror", mirror.process)
        assert mirror.process is not None
        context = mirror.client_context()
        assert await peer_certificate(mirror, context) == der(first)

        connector = aiohttp.TCPConnector(
            ssl=context, socket_factory=small_receive_buffer
        )
        url = f"{mirror.url}/v2/{published.repository}/blobs/{layer.digest}"
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=60)
            ) as http,
            http.get(url) as response,
        ):
            assert response.status == 200
            head = await response.content.readexactly(MiB)
            assert response.connection is not None
            transport = response.connection.transport
            assert transport is not None
            in_flight = transport.get_extra_info("ssl_object")

            # Rotate while the download waits: certificate, then key.
            replace_atomically(files.cert_file, second.certificate_pem)
            replace_atomically(files.key_file, second.key_pem)
            reloads = await until_reloads(mirror, "ok", 1)
            assert reloads == {"ok": 1.0}, reloads
            assert await peer_certificate(mirror, context) == der(second)
            assert in_flight.getpeercert(binary_form=True) == der(first)

            rest = await response.read()
        assert len(head) + len(rest) == layer.descriptor.size
        assert sha256_of(head + rest) == layer.digest

        # SIGHUP with a key that is not the certificate's. The watcher would
        # reload the changed files by itself within two intervals and count
        # the same failure, proving nothing about the signal; rewritten in
        # place with its inode, mtime and size kept, the change is one only
        # a SIGHUP acts on.
        mark = mirror.mark()
        rewrite_unnoticed(files.key_file, pki.ca.issue(SERVER_HOSTS).key_pem)
        os.kill(mirror.process.pid, signal.SIGHUP)
        reloads = await until_reloads(mirror, "failed", 1)
        assert reloads == {"ok": 1.0, "failed": 1.0}, reloads
        assert await peer_certificate(mirror, context) == der(second)
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, force_close=True)
            ) as http,
            http.get(f"{mirror.url}/v2/") as response,
        ):
            assert response.status == 200
        # Nor does the watcher retry the files the signal found bad.
        await asyncio.sleep(3 * WATCH)
        assert await tls_reloads(mirror) == {"ok": 1.0, "failed": 1.0}
        log = mirror.log_text(since=mark)
        assert "TLS reload failed, keeping the current certificate" in log, log
        assert mirror.process.alive()
    finally:
        mirror.stop()
