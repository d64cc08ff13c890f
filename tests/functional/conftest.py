"""Fixtures of the functional tests that serve the mirror on a real socket:
`start` runs `serve()` (the listener `mirror serve` uses) as a task."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.api.server import serve
from mirror.app import ADMIN, CACHE, METRICS, create_app
from mirror.config import Address, Config, load_config
from tests.fakes.registry import FakeRegistry

REPOSITORY = "library/app"
# How long cancelling serve() may take with nothing in flight.
STOP_TIMEOUT = 10.0
# An ephemeral port on loopback.
LOOPBACK_ANY = Address("127.0.0.1", 0)

ServerFactory = Callable[..., Awaitable[TestServer]]


# --- a mirror served on a real socket ----------------------------------------


@dataclass
class Served:
    """One `serve()` task, its app and its upstream."""

    port: int
    app: web.Application
    config: Config
    upstream: FakeRegistry
    task: asyncio.Task[None]
    admin_port: int | None = None  # server.admin_listen's, when it is set

    @property
    def url(self) -> str:
        scheme = "https" if self.config.server.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def blob_path(self, digest: str) -> str:
        return f"/v2/{REPOSITORY}/blobs/{digest}"

    def sample(self, name: str, **labels: str) -> float:
        """A metric's value straight from the app's registry (no connection)."""
        value = self.app[METRICS].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def settle(self) -> None:
        """Wait until downloads are committed and no blob is being sent."""
        cache = self.app[CACHE]
        async with asyncio.timeout(30):
            await cache.idle()
        for _ in range(2000):
            if not cache.pins:
                return
            await asyncio.sleep(0.005)
        pytest.fail(f"blobs still pinned after 10 s: {cache.pins}")

    async def until(
        self, name: str, value: float, within: float, **labels: str
    ) -> None:
        """Wait for a metric to reach `value`; fail with what it is instead."""
        deadline = asyncio.get_running_loop().time() + within
        while self.sample(name, **labels) != value:
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(
                    f"{name}{labels} is {self.sample(name, **labels)} after "
                    f"{within}s, expected {value}"
                )
            await asyncio.sleep(0.02)


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[ServeFactory]:
    """Start `serve()` tasks in front of a FakeRegistry (or the given one).

    Keyword arguments are config keys: ``server_max_connections="3"``. Each
    task is cancelled after the test, which fails unless that ends it within
    STOP_TIMEOUT with CancelledError.
    """
    started: list[Served] = []
    loop = asyncio.get_running_loop()

    async def factory(upstream: FakeRegistry | None = None, **settings: str) -> Served:
        upstream = upstream or FakeRegistry()
        server = await aiohttp_server(upstream.app())
        env = {
            "MIRROR_UPSTREAM_URL": str(server.make_url("")).rstrip("/"),
            "MIRROR_CACHE_DIR": str(tmp_path / f"cache{len(started)}"),
            "MIRROR_UPSTREAM_RETRY_BACKOFF": "0s",
            **{f"MIRROR_{k.upper()}": v for k, v in settings.items()},
        }
        config = load_config(None, env)
        # server.listen refuses port 0 (parse_address wants 1..65535), so the
        # ephemeral port is set on the parsed config.
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=LOOPBACK_ANY)
        )
        if config.server.admin_listen is not None:
            config = dataclasses.replace(
                config,
                server=dataclasses.replace(config.server, admin_listen=LOOPBACK_ANY),
            )
        app = create_app(config)
        bound: asyncio.Future[int] = loop.create_future()
        admin_bound: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(
            serve(
                app,
                config,
                app[METRICS],
                started=bound.set_result,
                admin=app.get(ADMIN),
                admin_started=admin_bound.set_result,
            )
        )

        def ended(task: asyncio.Task[None]) -> None:
            if not bound.done():  # serve() ended before listening: say why
                error = None if task.cancelled() else task.exception()
                bound.set_exception(error or RuntimeError("serve() returned early"))

        task.add_done_callback(ended)
        async with asyncio.timeout(15):
            port = await bound
        admin_port = await admin_bound if ADMIN in app else None
        served = Served(port, app, config, upstream, task, admin_port)
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in reversed(started):
            await stop_serving(served.task)
        # serve() installs handlers it does not remove (see
        # test_serve_leaves_no_signal_handlers); don't let them outlive it.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        loop.set_exception_handler(None)


async def stop_serving(task: asyncio.Task[None]) -> None:
    """Cancel a serve() task; fail unless it ends promptly by cancellation."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
    if not done:
        pytest.fail(f"serve() still running {STOP_TIMEOUT}s after cancel()")
    if not task.cancelled():
        error = task.exception()
        pytest.fail(f"serve() ended with {error!r} instead of being cancelled")


# --- watching a download -------------------------------------------------------


async def prefix_on_disk(app: web.Application, cache_dir: Path, size: int) -> None:
    """Wait until the one download's temp file holds `size` bytes and none
    of them is still in memory (the writer has dropped them from its
    window), so a reader joining now finds them on disk."""
    directory = cache_dir / "tmp"
    registry = app[METRICS].registry
    for _ in range(1000):
        on_disk = sum(f.stat().st_size for f in directory.glob("*"))
        held = registry.get_sample_value("mirror_blob_download_memory_bytes")
        if on_disk >= size and held == 0:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"the temp file never held {size} bytes with none in memory")


def record_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(offset, count) of every loop.sendfile from now on."""
    loop = asyncio.get_running_loop()
    real = loop.sendfile
    calls: list[tuple[int, int]] = []

    async def sendfile(
        transport: Any, file: Any, offset: int = 0, count: Any = None, **more: Any
    ) -> int:
        calls.append((offset, count))
        return await real(transport, file, offset, count, **more)

    monkeypatch.setattr(loop, "sendfile", sendfile)
    return calls
