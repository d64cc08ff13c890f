"""Address policy: `server.allow_from`, `server.trusted_proxies` with
X-Forwarded-For, and `server.max_requests_per_client`. The test client
connects from 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from mirror.app import METRICS
from mirror.config import ConfigError, load_config
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry

MANIFEST = "/v2/library/app/manifests/1"


async def mirror_with(make_mirror: MirrorFactory, **settings: str) -> Mirror:
    upstream = FakeRegistry()
    upstream.push_image("library/app", "1", [b"policy" * 100])
    return await make_mirror(upstream, **settings)


def refusals(mirror: Mirror, reason: str) -> float:
    """From the app's registry: /metrics itself may be refused."""
    registry = mirror.client.app[METRICS].registry
    value = registry.get_sample_value(
        "mirror_client_refusals_total", {"reason": reason}
    )
    return value or 0.0


async def code(resp: aiohttp.ClientResponse) -> str:
    return str(json.loads(await resp.read())["errors"][0]["code"])


async def test_an_address_outside_allow_from_gets_403_before_any_work(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await mirror_with(make_mirror, server_allow_from="10.0.0.0/8,192.0.2.7")
    for path in (MANIFEST, "/v2/", "/metrics", "/readyz"):
        resp = await mirror.client.get(path)
        assert resp.status == 403, path
        assert await code(resp) == "DENIED"
    assert (await mirror.client.get("/healthz")).status == 200
    assert mirror.upstream.count() == 0


async def test_an_address_inside_allow_from_is_served(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await mirror_with(make_mirror, server_allow_from="10.0.0.0/8, 127.0.0.0/8")
    assert (await mirror.client.get(MANIFEST)).status == 200


@pytest.mark.parametrize(
    ("forwarded", "status"),
    [
        (["203.0.113.9"], 200),
        (["198.51.100.1"], 403),
        (["198.51.100.1, 203.0.113.9"], 200),  # the proxy appended the client
        (["203.0.113.9, 198.51.100.1"], 403),  # what the client wrote is no proof
        (["198.51.100.1", "203.0.113.9, 127.0.0.1"], 200),  # two headers, a proxy hop
        (["not-an-address"], 403),
        ([], 403),  # the proxy itself is not in allow_from
    ],
)
async def test_x_forwarded_for_is_honoured_only_from_trusted_proxies(
    make_mirror: MirrorFactory, forwarded: list[str], status: int
) -> None:
    mirror = await mirror_with(
        make_mirror,
        server_allow_from="203.0.113.0/24",
        server_trusted_proxies="127.0.0.1",
    )
    headers = [("X-Forwarded-For", value) for value in forwarded]
    resp = await mirror.client.get(MANIFEST, headers=headers)
    assert resp.status == status


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await mirror_with(make_mirror, server_allow_from="203.0.113.0/24")
    resp = await mirror.client.get(MANIFEST, headers={"X-Forwarded-For": "203.0.113.9"})
    assert resp.status == 403
    assert json.loads(await resp.read())["errors"][0]["detail"] == {
        "address": "127.0.0.1"
    }
    assert refusals(mirror, "address") == 1


async def test_login_failures_are_throttled_per_forwarded_client(
    make_mirror: MirrorFactory, tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "htpasswd").write_text(f"ci:{hashed}\n")
    mirror = await mirror_with(
        make_mirror,
        auth_htpasswd=str(tmp_path / "htpasswd"),
        server_trusted_proxies="127.0.0.0/8",
    )

    def login(client: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"ci:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}", "X-Forwarded-For": client}

    for _ in range(10):
        resp = await mirror.client.get("/v2/", headers=login("198.51.100.1", "guess"))
        assert resp.status == 401
    resp = await mirror.client.get("/v2/", headers=login("198.51.100.1", "s3cret"))
    assert resp.status == 429
    resp = await mirror.client.get("/v2/", headers=login("198.51.100.2", "s3cret"))
    assert resp.status == 200


async def test_requests_in_flight_per_client_are_bounded(
    make_mirror: MirrorFactory,
) -> None:
    mirror = await mirror_with(make_mirror, server_max_requests_per_client="2")
    mirror.upstream.stall = asyncio.Event()
    held = [
        asyncio.create_task(mirror.client.get(f"/v2/library/app/manifests/{tag}"))
        for tag in ("1", "2")
    ]
    for _ in range(500):
        if mirror.upstream.count() >= 2:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the two requests never reached upstream")
    resp = await mirror.client.get(MANIFEST)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert await code(resp) == "TOOMANYREQUESTS"
    mirror.upstream.stall.set()
    statuses = sorted([(await task).status for task in held])
    assert statuses == [200, 404]  # tag 2 does not exist
    assert (await mirror.client.get(MANIFEST)).status == 200
    assert refusals(mirror, "busy") == 1


@pytest.mark.parametrize("value", ["10.0.0.0/33", "example.com", "10.0.0.0/8,,x"])
def test_a_network_that_is_not_one_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.allow_from: "):
        load_config(None, {"MIRROR_SERVER_ALLOW_FROM": value})
