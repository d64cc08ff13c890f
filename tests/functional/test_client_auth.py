"""Client authentication: `auth.htpasswd` with bcrypt entries, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import bcrypt
import pytest

from mirror.config import ConfigError, load_config
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry
from tests.promtext import parse_samples

REPOSITORY = "library/app"


def htpasswd(path: Path, users: dict[str, str], prefix: bytes = b"$2y$") -> Path:
    """An htpasswd file as `htpasswd -B` writes it (cost 4: tests are fast)."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
        lines.append(f"{user}:{(prefix + hashed[4:]).decode()}")
    path.write_text("# mirror users\n" + "\n".join(lines) + "\n")
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def results(mirror: Mirror) -> dict[str, float]:
    values = parse_samples(await (await mirror.client.get("/metrics")).text())
    prefix = 'mirror_client_auth_total{result="'
    return {k[len(prefix) : -2]: v for k, v in values.items() if k.startswith(prefix)}


async def with_users(
    make_mirror: MirrorFactory, tmp_path: Path, users: dict[str, str]
) -> Mirror:
    upstream = FakeRegistry()
    upstream.push_image(REPOSITORY, "1", [b"secret layer" * 100])
    path = htpasswd(tmp_path / "htpasswd", users)
    return await make_mirror(upstream, auth_htpasswd=str(path))


async def test_no_or_wrong_credentials_get_401_with_a_basic_challenge(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(make_mirror, tmp_path, {"ci": "s3cret"})
    for headers in (
        {},
        basic("ci", "wrong"),
        basic("nobody", "s3cret"),
        {"Authorization": "Bearer token"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
    ):
        for path in ("/v2/", f"/v2/{REPOSITORY}/manifests/1"):
            resp = await mirror.client.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
            body = json.loads(await resp.read())
            assert body["errors"][0]["code"] == "UNAUTHORIZED"
    assert mirror.upstream.count() == 0
    counted = await results(mirror)
    assert counted["missing"] == 8
    assert counted["rejected"] == 4


async def test_the_right_credentials_pull_and_are_checked_once(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(
        make_mirror, tmp_path, {"ci": "s3cret", "dev": "pässwörd:with:colons"}
    )
    for user, password in (("ci", "s3cret"), ("dev", "pässwörd:with:colons")):
        for _ in range(3):
            resp = await mirror.client.get(
                f"/v2/{REPOSITORY}/manifests/1", headers=basic(user, password)
            )
            assert resp.status == 200
    counted = await results(mirror)
    assert counted["verified"] == 2  # bcrypt once per user...
    assert counted["cached"] == 4  # ...then remembered
    mirror.clock.advance(120)  # past the memory of a verified login
    resp = await mirror.client.get("/v2/", headers=basic("ci", "s3cret"))
    assert resp.status == 200
    assert (await results(mirror))["verified"] == 3


async def test_health_and_metrics_stay_open(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(make_mirror, tmp_path, {"ci": "s3cret"})
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await mirror.client.get(path)).status == 200


async def test_the_file_is_read_again_when_it_changes(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(make_mirror, tmp_path, {"ci": "old"})
    assert (await mirror.client.get("/v2/", headers=basic("ci", "old"))).status == 200
    htpasswd(tmp_path / "htpasswd", {"ci": "new"})
    mirror.clock.advance(5)
    assert (await mirror.client.get("/v2/", headers=basic("ci", "old"))).status == 401
    assert (await mirror.client.get("/v2/", headers=basic("ci", "new"))).status == 200

    # A file that no longer loads keeps the users read before.
    (tmp_path / "htpasswd").write_text("ci:plaintext\n")
    mirror.clock.advance(5)
    assert (await mirror.client.get("/v2/", headers=basic("ci", "new"))).status == 200


async def test_repeated_failures_from_one_address_are_throttled(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(make_mirror, tmp_path, {"ci": "s3cret"})
    for _ in range(10):
        resp = await mirror.client.get("/v2/", headers=basic("ci", "guess"))
        assert resp.status == 401
    # Now even the right password waits, and no bcrypt check is spent.
    resp = await mirror.client.get("/v2/", headers=basic("ci", "s3cret"))
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 61
    assert json.loads(await resp.read())["errors"][0]["code"] == "TOOMANYREQUESTS"
    counted = await results(mirror)
    assert counted["rejected"] == 10
    assert counted["throttled"] == 1
    assert counted["verified"] == 0
    mirror.clock.advance(61)
    resp = await mirror.client.get("/v2/", headers=basic("ci", "s3cret"))
    assert resp.status == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", ":1: not user:bcrypt-hash"),
        ("# only\nci:$apr1$x$y\n", ":2: not user:bcrypt-hash"),
        ("no-colon\n", ":1: not user:bcrypt-hash"),
    ],
)
def test_an_htpasswd_file_that_does_not_load_is_a_config_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"MIRROR_AUTH_HTPASSWD": str(path)})
    assert str(raised.value).startswith("auth.htpasswd: ")
    assert message in str(raised.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, {"MIRROR_AUTH_HTPASSWD": str(tmp_path / "missing")})


async def test_concurrent_first_logins_share_one_bcrypt_check_and_use_renews_it(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await with_users(make_mirror, tmp_path, {"ci": "s3cret"})
    statuses = await asyncio.gather(
        *(mirror.client.get("/v2/", headers=basic("ci", "s3cret")) for _ in range(20))
    )
    assert {r.status for r in statuses} == {200}
    assert (await results(mirror))["verified"] == 1
    for _ in range(3):  # used within every minute: still remembered
        mirror.clock.advance(50)
        resp = await mirror.client.get("/v2/", headers=basic("ci", "s3cret"))
        assert resp.status == 200
    assert (await results(mirror))["verified"] == 1
