"""Composition root: builds the object graph and its lifecycle.

`create_app(config)` wires MetadataStore, BlobStore, UpstreamClient, Metrics,
PullThroughCache and the handlers with constructor injection; nothing is
opened until the aiohttp app starts, when one cleanup context opens the
database, the blob store and the upstream session, and closes them in
reverse order on shutdown. Tests use this same factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror.api.errors import error_middleware
from mirror.api.handlers import RegistryHandlers
from mirror.api.routes import add_routes, metrics_middleware
from mirror.cache.blobs import BlobStore
from mirror.cache.metadata import MetadataStore
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.proxy import PullThroughCache
from mirror.upstream.client import UpstreamClient

log = logging.getLogger(__name__)

CACHE = web.AppKey("cache", PullThroughCache)
METRICS = web.AppKey("metrics", Metrics)
# How often batched last-access times are written to SQLite.
ACCESS_FLUSH_INTERVAL = 10.0
DATABASE_NAME = "mirror.db"


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The mirror as an aiohttp app; nothing is opened until it starts.

    `clock` is wall time (stored in the database), `monotonic` measures
    intervals (token expiry, throttling); tests pass fake clocks for both.
    """
    metadata = MetadataStore(config.cache.dir / DATABASE_NAME)
    blobs = BlobStore(config.cache.dir)
    metrics = Metrics(registry)
    upstream = UpstreamClient(config.upstream, metrics, clock=monotonic)
    cache = PullThroughCache(
        metadata,
        blobs,
        upstream,
        metrics,
        tag_ttl=config.cache.tag_ttl,
        max_stale=config.cache.max_stale,
        resume_attempts=config.upstream.resume_attempts,
        clock=clock,
    )
    handlers = RegistryHandlers(cache, metrics)

    app = web.Application(middlewares=[metrics_middleware(metrics), error_middleware])
    app[CACHE] = cache
    app[METRICS] = metrics
    add_routes(app, handlers)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await metadata.open()
            stack.push_async_callback(metadata.close)
            await blobs.open()
            await upstream.open()
            stack.push_async_callback(upstream.close)
            flusher = asyncio.create_task(_flush_access(metadata))
            stack.push_async_callback(_cancel, flusher)
            stack.push_async_callback(cache.close)
            log.info(
                "mirroring %s as %s into %s",
                config.upstream.url,
                config.upstream.username or "anonymous",
                config.cache.dir,
            )
            yield

    app.cleanup_ctx.append(lifecycle)
    return app


async def _flush_access(metadata: MetadataStore) -> None:
    while True:
        await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
        try:
            await metadata.flush_access()
        except Exception:
            log.exception("writing access times failed; will retry")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
