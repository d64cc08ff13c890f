"""HTTPS on the listener: `server.tls_cert` / `tls_key`, rotation without a
restart (on SIGHUP and when the files change), mTLS with `server.client_ca`.

Each test runs `serve()` on a real socket (the `start` fixture) and talks to
it over TLS with aiohttp or raw `ssl` streams, checking which certificate
each connection was given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest

from mirror.cli import reload_config
from mirror.config import Config, ConfigError, load_config
from tests.fakes.registry import CHUNK, FakeRegistry, sha256
from tests.fakes.tls import CertificateAuthority, ServerCertificate, TlsFiles
from tests.functional.conftest import (
    REPOSITORY,
    Served,
    ServeFactory,
    prefix_on_disk,
    record_sendfile,
)

MiB = 1024 * 1024


def write(server: ServerCertificate, directory: Path) -> TlsFiles:
    return TlsFiles.write(server, directory)


def tls_settings(files: TlsFiles, **more: str) -> dict[str, str]:
    return {
        "server_tls_cert": str(files.cert_file),
        "server_tls_key": str(files.key_file),
        **more,
    }


async def peer_certificate(
    served: Served, context: ssl.SSLContext
) -> tuple[bytes, asyncio.StreamWriter]:
    """The DER certificate a new connection is given (the writer stays open)."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=context
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return der, writer


def der(certificate: ServerCertificate) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certificate.certificate_pem.decode())


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority()


async def test_serves_https_with_tls_12_or_newer_and_modern_ciphers(
    start: ServeFactory, tmp_path: Path, ca: CertificateAuthority
) -> None:
    files = write(ca.issue(), tmp_path / "tls")
    upstream = FakeRegistry()
    image = upstream.push_image(REPOSITORY, "1", [b"tls" * 1000])
    served = await start(upstream, **tls_settings(files))
    client = files.client_context()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{served.url}/v2/{REPOSITORY}/manifests/1", ssl=client) as r,
    ):
        assert r.status == 200
        assert await r.read() == image.manifest
    _der, writer = await peer_certificate(served, client)
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    await close(writer)

    # A TLS 1.2 client offering only suites without forward secrecy or AEAD
    # is refused; one offering ECDHE with AES-GCM is served.
    for ciphers, served_ok in (
        ("AES128-SHA:AES256-SHA256", False),
        ("ECDHE+AESGCM", True),
    ):
        old = files.client_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.set_ciphers(ciphers)
        if served_ok:
            _der, writer = await peer_certificate(served, old)
            await close(writer)
        else:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await peer_certificate(served, old)


async def test_plain_http_to_the_https_port_gets_no_http_answer(
    start: ServeFactory, tmp_path: Path, ca: CertificateAuthority
) -> None:
    files = write(ca.issue(), tmp_path / "tls")
    served = await start(**tls_settings(files))
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read(100)
    assert not answer.startswith(b"HTTP/")
    writer.close()


async def test_a_certificate_rotated_on_disk_serves_new_connections_and_spares_old(
    start: ServeFactory, tmp_path: Path, ca: CertificateAuthority
) -> None:
    first, second = ca.issue(), ca.issue()
    files = write(first, tmp_path / "tls")
    upstream = FakeRegistry()
    data = os.urandom(24 * MiB)
    digest = upstream.push_image(REPOSITORY, "1", [data]).layers[0]
    served = await start(
        upstream, **tls_settings(files, server_tls_watch_interval="50ms")
    )
    client = files.client_context()
    der_before, writer = await peer_certificate(served, client)
    assert der_before == der(first)
    await close(writer)

    async with aiohttp.ClientSession() as http:
        # A download on a connection made with the first certificate...
        response = await http.get(served.url + served.blob_path(digest), ssl=client)
        assert response.status == 200
        head = await response.content.readexactly(MiB)
        # ...while the files are replaced, key and certificate.
        write(second, tmp_path / "tls")
        await served.until("mirror_tls_reloads_total", 1, within=5, result="ok")
        der_after, writer = await peer_certificate(served, client)
        assert der_after == der(second)
        await close(writer)
        rest = await response.read()
        assert sha256(head + rest) == digest


async def test_sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old(
    start: ServeFactory,
    tmp_path: Path,
    ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = ca.issue(), ca.issue()
    files = write(first, tmp_path / "tls")
    served = await start(**tls_settings(files, server_tls_watch_interval="0"))
    client = files.client_context()

    write(second, tmp_path / "tls")
    await asyncio.sleep(0.2)  # not watching: nothing changes without a signal
    der_now, writer = await peer_certificate(served, client)
    assert der_now == der(first)
    await close(writer)
    os.kill(os.getpid(), signal.SIGHUP)
    await served.until("mirror_tls_reloads_total", 1, within=5, result="ok")
    der_now, writer = await peer_certificate(served, client)
    assert der_now == der(second)
    await close(writer)

    files.key_file.write_bytes(ca.issue().key_pem)  # a key of another cert
    caplog.set_level(logging.ERROR, logger="mirror.tls")
    os.kill(os.getpid(), signal.SIGHUP)
    await served.until("mirror_tls_reloads_total", 1, within=5, result="failed")
    der_now, writer = await peer_certificate(served, client)
    assert der_now == der(second)
    await close(writer)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "mirror.tls" and r.levelno >= logging.ERROR
    ]
    assert lines, "the failed reload was not logged"
    for line in lines:
        assert "keeping the current certificate" in line
        assert "\n" not in line


async def test_client_ca_requires_a_client_certificate_it_issued(
    start: ServeFactory, tmp_path: Path, ca: CertificateAuthority
) -> None:
    files = write(ca.issue(), tmp_path / "tls")
    clients = CertificateAuthority("client CA")
    client_ca = clients.write(tmp_path / "client-ca.pem")
    served = await start(**tls_settings(files, server_client_ca=str(client_ca)))

    async def status(context: ssl.SSLContext) -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{served.url}/v2/", ssl=context) as response,
        ):
            return response.status

    anonymous = files.client_context()
    with pytest.raises(aiohttp.ClientError):
        await status(anonymous)

    stranger = write(
        CertificateAuthority().issue(["node"], client=True), tmp_path / "s"
    )
    wrong = files.client_context()
    wrong.load_cert_chain(stranger.cert_file, stranger.key_file)
    with pytest.raises(aiohttp.ClientError):
        await status(wrong)

    node = write(clients.issue(["node-1"], client=True), tmp_path / "node")
    right = files.client_context()
    right.load_cert_chain(node.cert_file, node.key_file)
    assert await status(right) == 200


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"MIRROR_SERVER_TLS_CERT": "{cert}"},
            "server.tls_key: tls_cert and tls_key go together",
        ),
        (
            {"MIRROR_SERVER_TLS_KEY": "{key}"},
            "server.tls_cert: tls_cert and tls_key go together",
        ),
        ({"MIRROR_SERVER_CLIENT_CA": "{ca}"}, "server.client_ca: needs tls_cert"),
        (
            {
                "MIRROR_SERVER_TLS_CERT": "{tmp}/missing.pem",
                "MIRROR_SERVER_TLS_KEY": "{key}",
            },
            "missing.pem: no such file",
        ),
        (
            {"MIRROR_SERVER_TLS_CERT": "{key}", "MIRROR_SERVER_TLS_KEY": "{key}"},
            "not a certificate and its key",
        ),
        (
            {
                "MIRROR_SERVER_TLS_CERT": "{cert}",
                "MIRROR_SERVER_TLS_KEY": "{key}",
                "MIRROR_SERVER_CLIENT_CA": "{key}",
            },
            "not a PEM CA bundle",
        ),
    ],
    ids=["cert-only", "key-only", "ca-only", "missing", "key-as-cert", "key-as-ca"],
)
def test_tls_settings_that_do_not_load_are_one_line_errors(
    tmp_path: Path, ca: CertificateAuthority, settings: dict[str, str], message: str
) -> None:
    files = write(ca.issue(), tmp_path / "tls")
    names = {
        "cert": str(files.cert_file),
        "key": str(files.key_file),
        "ca": str(files.ca_file),
        "tmp": str(tmp_path),
    }
    environ = {k: v.format(**names) for k, v in settings.items()}
    with pytest.raises(ConfigError) as raised:
        load_config(None, environ)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_reload_does_not_hold_the_configuration_back_on_a_bad_certificate(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """SIGHUP re-reads the config without loading the certificates (the TLS
    reload reports those on its own): mid-rotation, the rest still applies."""
    files = write(ca.issue(), tmp_path / "tls")
    files.key_file.write_bytes(ca.issue().key_pem)  # not the cert's key
    environ = {
        "MIRROR_SERVER_TLS_CERT": str(files.cert_file),
        "MIRROR_SERVER_TLS_KEY": str(files.key_file),
        "MIRROR_CACHE_TAG_TTL": "1m",
    }
    with pytest.raises(ConfigError):
        load_config(None, environ)
    assert load_config(None, environ, load_certificates=False).cache.tag_ttl == 60


def test_sighup_applies_other_keys_while_the_certificate_is_mid_rotation(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write(ca.issue(), tmp_path / "tls")
    files.key_file.write_bytes(ca.issue().key_pem)
    config_file = tmp_path / "mirror.toml"
    config_file.write_text(
        f'[server]\ntls_cert = "{files.cert_file}"\ntls_key = "{files.key_file}"\n'
        '[cache]\ntag_ttl = "2m"\n'
    )
    for name in [n for n in os.environ if n.startswith("MIRROR_")]:
        monkeypatch.delenv(name)
    applied: list[Config] = []

    def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    reload_config(apply, config_file)
    assert [c.cache.tag_ttl for c in applied] == [120.0]


async def test_a_certificate_file_may_carry_its_chain(
    start: ServeFactory, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """The leaf, then the intermediate that signed it: a client that trusts
    only the root verifies the chain the mirror sends."""
    intermediate = CertificateAuthority("mirror test intermediate", issuer=ca)
    leaf = intermediate.issue()
    files = write(leaf, tmp_path / "tls")
    files.cert_file.write_bytes(leaf.certificate_pem + intermediate.pem)
    ca.write(files.ca_file)  # the root alone
    served = await start(**tls_settings(files))
    der_now, writer = await peer_certificate(served, files.client_context())
    assert der_now == der(leaf)
    await close(writer)
    # Without the intermediate in the file, the same client cannot verify.
    files.cert_file.write_bytes(leaf.certificate_pem)
    os.kill(os.getpid(), signal.SIGHUP)
    await served.until("mirror_tls_reloads_total", 1, within=5, result="ok")
    with pytest.raises(ssl.SSLCertVerificationError):
        await peer_certificate(served, files.client_context())


async def test_a_joiner_over_tls_gets_the_part_on_disk_without_sendfile(
    start: ServeFactory,
    tmp_path: Path,
    ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # sendfile cannot encrypt: over TLS, what a joiner finds on disk is read
    # with pread and sent through the TLS transport instead.
    files = write(ca.issue(), tmp_path / "tls")
    upstream = FakeRegistry()
    upstream.gate = asyncio.Event()
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    served = await start(upstream, **tls_settings(files))
    calls = record_sendfile(monkeypatch)
    url = f"{served.url}{served.blob_path(digest)}"
    client = files.client_context()
    async with aiohttp.ClientSession() as http:
        first = await http.get(url, ssl=client)
        head_of_first = await first.content.readany()
        await prefix_on_disk(served.app, served.config.cache.dir, CHUNK)
        late = await http.get(url, ssl=client)
        late_head = await late.content.readexactly(CHUNK)
        upstream.gate.set()
        assert head_of_first + await first.read() == data
        assert late_head + await late.read() == data
        first.close()
        late.close()
    assert calls == []
    assert sha256(data) == digest
    assert upstream.count("blob", "GET") == 1
