"""The admin listener: `server.admin_listen` serves /metrics, /healthz and
/readyz apart from the registry port, with its own TLS and allow-list."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from mirror.config import ConfigError, load_config
from tests.fakes.tls import CertificateAuthority, TlsFiles
from tests.functional.conftest import ServeFactory

OPERATIONS = ("/metrics", "/healthz", "/readyz")


async def status(url: str, **options: object) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **options) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read()


async def test_operations_move_to_the_admin_listener(start: ServeFactory) -> None:
    served = await start(server_admin_listen="127.0.0.1:0")
    admin = f"http://127.0.0.1:{served.admin_port}"
    for path in OPERATIONS:
        code, body = await status(admin + path)
        assert code == 200, path
        gone, body = await status(served.url + path)
        assert gone == 404, path
        assert json.loads(body)["errors"][0]["code"] == "NOT_FOUND"
    code, body = await status(admin + "/metrics")
    assert b"mirror_http_requests_total" in body
    assert (await status(served.url + "/v2/"))[0] == 200
    # The registry API is not on the admin port.
    assert (await status(admin + "/v2/"))[0] == 404


async def test_without_admin_listen_operations_stay_on_the_registry_port(
    start: ServeFactory,
) -> None:
    served = await start()
    assert served.admin_port is None
    for path in OPERATIONS:
        assert (await status(served.url + path))[0] == 200


async def test_the_admin_listener_has_its_own_allow_list(start: ServeFactory) -> None:
    served = await start(
        server_admin_listen="127.0.0.1:0", server_admin_allow_from="10.0.0.0/8"
    )
    admin = f"http://127.0.0.1:{served.admin_port}"
    code, body = await status(admin + "/metrics")
    assert code == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert (await status(admin + "/healthz"))[0] == 200
    assert (await status(served.url + "/v2/"))[0] == 200  # the registry port is open


async def test_the_admin_listener_serves_https_with_its_own_certificate(
    start: ServeFactory, tmp_path: Path
) -> None:
    ca = CertificateAuthority()
    files = TlsFiles.write(ca.issue(), tmp_path / "admin")
    served = await start(
        server_admin_listen="127.0.0.1:0",
        server_admin_tls_cert=str(files.cert_file),
        server_admin_tls_key=str(files.key_file),
    )
    code, _ = await status(
        f"https://127.0.0.1:{served.admin_port}/metrics", ssl=files.client_context()
    )
    assert code == 200
    assert served.url.startswith("http://")  # the registry port stays plain


def test_admin_settings_without_admin_listen_or_on_the_same_port_are_errors(
    tmp_path: Path,
) -> None:
    files = TlsFiles.write(CertificateAuthority().issue(), tmp_path / "admin")
    cases = [
        (
            {
                "MIRROR_SERVER_ADMIN_TLS_CERT": str(files.cert_file),
                "MIRROR_SERVER_ADMIN_TLS_KEY": str(files.key_file),
            },
            "admin_* keys need admin_listen",
        ),
        ({"MIRROR_SERVER_ADMIN_ALLOW_FROM": "10.0.0.0/8"}, "need admin_listen"),
        (
            {
                "MIRROR_SERVER_LISTEN": "127.0.0.1:5000",
                "MIRROR_SERVER_ADMIN_LISTEN": "127.0.0.1:5000",
            },
            "must differ from server.listen",
        ),
        (
            {
                "MIRROR_SERVER_ADMIN_LISTEN": "127.0.0.1:9090",
                "MIRROR_SERVER_ADMIN_TLS_CERT": str(files.cert_file),
            },
            "admin_tls_cert and admin_tls_key go together",
        ),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigError) as raised:
            load_config(None, environ)
        assert message in str(raised.value), environ
