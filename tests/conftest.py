"""Shared fixtures: a FakeRegistry upstream and a mirror app in front of it,
plus the network between them (a LatencyProxy, a test CA for TLS)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import CACHE, create_app
from mirror.config import Config, load_config, registry_env_name
from tests.fakes.network import LatencyProxy
from tests.fakes.registry import FakeRegistry
from tests.fakes.tls import TlsFiles


@dataclass
class Mirror:
    client: TestClient[web.Request, web.Application]
    upstream: FakeRegistry  # docker.io
    config: Config
    clock: FakeClock
    # The other registries, by the host clients name them with.
    registries: dict[str, FakeRegistry] = field(default_factory=dict)

    async def settle(self) -> None:
        """Wait for downloads to reach the store (a client has every byte
        once the digest matched, slightly before the blob is committed) and
        for handlers to let go of the blobs they sent (a client has every
        byte slightly before the handler returns)."""
        cache = self.client.app[CACHE]
        await cache.idle()
        for _ in range(1000):
            if not cache.pins:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"blobs still pinned after their responses: {cache.pins}")


class FakeClock:
    """A wall clock tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MirrorFactory = Callable[..., Awaitable[Mirror]]
ProxyFactory = Callable[..., LatencyProxy]
# Given the upstream server, the URL the mirror is to use for it.
Route = Callable[[TestServer], str]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and a server certificate for 127.0.0.1/localhost/::1."""
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def latency_proxy() -> Iterator[ProxyFactory]:
    """Start LatencyProxies (arguments as for ``LatencyProxy``); each is
    stopped after the test, which fails if a proxy hit an internal error."""
    started: list[LatencyProxy] = []

    def start(target_port: int, **options: Any) -> LatencyProxy:
        proxy = LatencyProxy(target_port, **options)
        started.append(proxy.start())
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def make_mirror(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> MirrorFactory:
    """Start a FakeRegistry (or use the given one) and a mirror in front of it.

    ``server_ssl`` serves the registry over TLS; ``route`` turns its server
    into the URL the mirror is given (e.g. a LatencyProxy's in front of it).
    ``registries`` adds other upstream registries, by host (``ghcr.io``),
    each a FakeRegistry served on its own port.
    ``server_kwargs`` go to aiohttp's runner (e.g. ``handler_cancellation``,
    as ``mirror serve`` has it). Other keyword arguments are config keys:
    ``upstream_read_timeout="1s"``.
    """
    counter = 0

    async def make(
        upstream: FakeRegistry | None = None,
        *,
        server_ssl: ssl.SSLContext | None = None,
        route: Route | None = None,
        server_kwargs: dict[str, object] | None = None,
        registries: dict[str, FakeRegistry] | None = None,
        **settings: str,
    ) -> Mirror:
        nonlocal counter
        counter += 1
        upstream = upstream or FakeRegistry()
        server = await aiohttp_server(upstream.app(), ssl=server_ssl)
        url = route(server) if route else str(server.make_url("")).rstrip("/")
        env = {
            "MIRROR_UPSTREAM_URL": url,
            "MIRROR_CACHE_DIR": str(tmp_path / f"cache{counter}"),
            # Retry at once: tests assert on request counts, not on waiting.
            "MIRROR_UPSTREAM_RETRY_BACKOFF": "0s",
            **{f"MIRROR_{k.upper()}": v for k, v in settings.items()},
        }
        for host, fake in (registries or {}).items():
            other = await aiohttp_server(fake.app())
            env[registry_env_name(host, "url")] = str(other.make_url("")).rstrip("/")
            env[registry_env_name(host, "retry_backoff")] = "0s"
        if registries:
            env["MIRROR_REGISTRIES"] = ",".join(registries)
        config = load_config(None, env)
        clock = FakeClock()
        app = create_app(config, clock=clock, monotonic=clock)
        client = await aiohttp_client(app, server_kwargs=server_kwargs or {})
        return Mirror(client, upstream, config, clock, dict(registries or {}))

    return make


def ci() -> bool:
    return os.environ.get("CI") == "true"


# A unit or functional test runs in well under a second or two; one that
# takes this long is hung (a response never ended, a lock never released).
FAST_SUITE_TIMEOUT = 60
_FAST_SUITES = ("unit", "functional")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give unit and functional tests FAST_SUITE_TIMEOUT, unless they set one."""
    root = Path(__file__).parent
    for item in items:
        suite = (
            item.path.relative_to(root).parts[0] if root in item.path.parents else ""
        )
        if suite in _FAST_SUITES and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_SUITE_TIMEOUT))
