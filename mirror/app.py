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
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror.api.errors import error_middleware
from mirror.api.handlers import RegistryHandlers
from mirror.api.routes import add_routes, metrics_middleware
from mirror.api.server import serve
from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor, PinSet
from mirror.cache.integrity import reconcile
from mirror.cache.metadata import DATABASE_NAME, MetadataStore
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.proxy import PullThroughCache
from mirror.upstream.client import UpstreamClient

log = logging.getLogger(__name__)

CACHE = web.AppKey("cache", PullThroughCache)
METRICS = web.AppKey("metrics", Metrics)
EVICTOR = web.AppKey("evictor", Evictor)
RELOAD: web.AppKey[Callable[[Config], list[str]]] = web.AppKey("reload")
# Keys a SIGHUP applies without a restart.
RELOADABLE_KEYS = frozenset(
    {
        "cache.tag_ttl",
        "cache.max_stale",
        "cache.max_size",
        "cache.min_free",
        "cache.low_watermark",
        "cache.eviction_interval",
        "upstream.ratelimit_warn_below",
        "log.level",
    }
)
# How often batched last-access times are written to SQLite.
ACCESS_FLUSH_INTERVAL = 10.0


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
    pins = PinSet()
    evictor = Evictor(
        metadata,
        blobs,
        metrics,
        pins,
        max_size=config.cache.max_size,
        min_free=config.cache.min_free,
        low_watermark=config.cache.low_watermark,
        interval=config.cache.eviction_interval,
    )
    cache = PullThroughCache(
        metadata,
        blobs,
        upstream,
        metrics,
        evictor=evictor,
        pins=pins,
        tag_ttl=config.cache.tag_ttl,
        max_stale=config.cache.max_stale,
        resume_attempts=config.upstream.resume_attempts,
        reader_timeout=config.upstream.read_timeout,
        max_downloads=config.upstream.max_downloads,
        clock=clock,
    )
    handlers = RegistryHandlers(cache, metrics, send_timeout=config.server.send_timeout)

    app = web.Application(middlewares=[metrics_middleware(metrics), error_middleware])
    app[CACHE] = cache
    app[METRICS] = metrics
    app[EVICTOR] = evictor
    add_routes(app, handlers)
    current = config

    def reload(new: Config) -> list[str]:
        """Apply what can change live; returns the changed keys that cannot."""
        nonlocal current
        cache.tag_ttl = new.cache.tag_ttl
        cache.max_stale = new.cache.max_stale
        evictor.max_size = new.cache.max_size
        evictor.min_free = new.cache.min_free
        evictor.low_watermark = new.cache.low_watermark
        evictor.interval = new.cache.eviction_interval
        upstream.ratelimit.warn_below = new.upstream.ratelimit_warn_below
        logging.getLogger("mirror").setLevel(new.log.level.upper())
        evictor.trigger()
        changed = [
            key for key in _changed_keys(current, new) if key not in RELOADABLE_KEYS
        ]
        current = new
        return changed

    app[RELOAD] = reload

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await metadata.open()
            stack.push_async_callback(metadata.close)
            await blobs.open()
            await reconcile(metadata, blobs, clock())
            await evictor.load()
            await upstream.open()
            stack.push_async_callback(upstream.close)
            flusher = asyncio.create_task(_housekeeping(metadata, cache, evictor))
            stack.push_async_callback(_cancel, flusher)
            worker = asyncio.create_task(evictor.run())
            stack.push_async_callback(_cancel, worker)
            stack.push_async_callback(cache.close)
            evictor.trigger()  # the budget may have shrunk while we were down
            log.info(
                "mirroring %s (%s) into %s",
                config.upstream.url,
                "with credentials" if config.upstream.username else "anonymously",
                config.cache.dir,
            )
            yield

    app.cleanup_ctx.append(lifecycle)
    return app


async def run(
    config: Config, *, on_reload: Callable[[web.Application], None] | None = None
) -> None:
    """Build the app and serve it until SIGTERM/SIGINT; SIGHUP calls
    `on_reload(app)`. Raises OSError if the address cannot be bound."""
    app = create_app(config)
    await serve(
        app,
        config,
        app[METRICS],
        on_reload=(lambda: on_reload(app)) if on_reload is not None else None,
    )


async def _housekeeping(
    metadata: MetadataStore, cache: PullThroughCache, evictor: Evictor
) -> None:
    """Write batched access times; notice changes made by the operator CLI."""
    seen = await metadata.data_version()
    while True:
        await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
        try:
            await metadata.flush_access()
            version = await metadata.data_version()
            if version != seen:
                seen = version
                cache.forget()
                await evictor.load()
        except Exception:
            log.exception("housekeeping failed; will retry")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _changed_keys(old: Config, new: Config) -> Iterator[str]:
    """`section.key` of every value that differs between two configs."""
    for section in dataclasses.fields(old):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for key in dataclasses.fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                yield f"{section.name}.{key.name}"
