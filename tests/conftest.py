"""Shared fixtures: a FakeRegistry upstream and a mirror app in front of it."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror.app import CACHE, create_app
from mirror.config import Config, load_config
from tests.fakes.registry import FakeRegistry


@dataclass
class Mirror:
    client: TestClient[web.Request, web.Application]
    upstream: FakeRegistry
    config: Config
    clock: FakeClock

    async def settle(self) -> None:
        """Wait for downloads to reach the store: a client has every byte
        once the digest matched, slightly before the blob is committed."""
        await self.client.app[CACHE].idle()


class FakeClock:
    """A wall clock tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MirrorFactory = Callable[..., Awaitable[Mirror]]


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def make_mirror(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> MirrorFactory:
    """Start a FakeRegistry (or use the given one) and a mirror in front of it."""
    counter = 0

    async def make(upstream: FakeRegistry | None = None, **settings: str) -> Mirror:
        nonlocal counter
        counter += 1
        upstream = upstream or FakeRegistry()
        server = await aiohttp_server(upstream.app())
        env = {
            "MIRROR_UPSTREAM_URL": str(server.make_url("")).rstrip("/"),
            "MIRROR_CACHE_DIR": str(tmp_path / f"cache{counter}"),
            # Retry at once: tests assert on request counts, not on waiting.
            "MIRROR_UPSTREAM_RETRY_BACKOFF": "0s",
            **{f"MIRROR_{k.upper()}": v for k, v in settings.items()},
        }
        config = load_config(None, env)
        clock = FakeClock()
        app = create_app(config, clock=clock, monotonic=clock)
        client = await aiohttp_client(app)
        return Mirror(client, upstream, config, clock)

    return make


def ci() -> bool:
    return os.environ.get("CI") == "true"
