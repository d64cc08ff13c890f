"""Composition root: builds the object graph and its lifecycle.

`create_app(config)` wires MetadataStore, BlobStore, Metrics, one Registry
(an UpstreamClient and its policies) per configured registry over shared
connection pools, PullThroughCache and the handlers with constructor
injection; nothing is opened until the aiohttp app starts, when one cleanup
context opens the database, the blob store and the upstream sessions, and
closes them in reverse order on shutdown. Tests use this same factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror.api.clientauth import ClientAuth, auth_middleware
from mirror.api.clients import ClientPolicy, client_middleware
from mirror.api.errors import error_middleware
from mirror.api.handlers import RegistryHandlers
from mirror.api.routes import (
    add_operations_routes,
    add_routes,
    echo_request_id,
    metrics_middleware,
)
from mirror.api.routing import echo_namespace
from mirror.api.server import serve
from mirror.api.status import StatusPage
from mirror.cache.blobs import BlobStore
from mirror.cache.eviction import Evictor, PinSet
from mirror.cache.integrity import reconcile
from mirror.cache.metadata import DATABASE_NAME, MetadataStore
from mirror.config import Config, RegistryConfig
from mirror.configdiff import changes
from mirror.metrics import Metrics, RegistryMetrics
from mirror.proxy import PullThroughCache
from mirror.registry import Registries, Registry
from mirror.stats import Stats
from mirror.upstream.client import UpstreamClient, UpstreamPools

log = logging.getLogger(__name__)

CACHE = web.AppKey("cache", PullThroughCache)
METRICS = web.AppKey("metrics", Metrics)
EVICTOR = web.AppKey("evictor", Evictor)
# The status page's in-memory history.
STATS = web.AppKey("stats", Stats)
RELOAD: web.AppKey[Callable[[Config], list[str]]] = web.AppKey("reload")
# /metrics, /healthz and /readyz, when server.admin_listen serves them.
ADMIN = web.AppKey("admin", web.Application)
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
# Keys of a [registries."<host>"] table a SIGHUP applies.
RELOADABLE_REGISTRY_KEYS = frozenset({"tag_ttl", "max_stale", "ratelimit_warn_below"})
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
    pools = UpstreamPools(
        config.upstream.max_connections, config.upstream.max_downloads
    )
    clients: dict[str, UpstreamClient] = {}
    registries = []
    for settings in config.registry_configs():
        bound = RegistryMetrics(metrics, settings.host)
        client = UpstreamClient(settings.upstream, bound, pools, clock=monotonic)
        clients[settings.host] = client
        registries.append(Registry(settings, client, bound))
    served = Registries(registries)
    pins = PinSet()
    stats = Stats(clock)
    evictor = Evictor(
        metadata,
        blobs,
        metrics,
        pins,
        max_size=config.cache.max_size,
        min_free=config.cache.min_free,
        low_watermark=config.cache.low_watermark,
        interval=config.cache.eviction_interval,
        on_pass=stats.evicted,
    )
    cache = PullThroughCache(
        metadata,
        blobs,
        served,
        metrics,
        evictor=evictor,
        pins=pins,
        max_downloads=config.upstream.max_downloads,
        download_memory=config.upstream.download_memory,
        clock=clock,
    )
    handlers = RegistryHandlers(cache, metrics, send_timeout=config.server.send_timeout)
    metrics.ready.set_function(lambda: 1.0 if cache.readiness()[0] else 0.0)
    metrics.disk_free.set_function(lambda: _free_bytes(config.cache.dir))

    middlewares = [metrics_middleware(metrics, stats)]
    policy = ClientPolicy.of(config.server, metrics)
    if policy is not None:
        middlewares.append(client_middleware(policy))
    middlewares.append(error_middleware)
    auth = None
    if config.auth.htpasswd is not None:
        auth = ClientAuth(config.auth.htpasswd, metrics, clock=monotonic)
        middlewares.append(auth_middleware(auth))
    windows = {host: _window(client) for host, client in clients.items()}
    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(echo_namespace)
    app.on_response_prepare.append(echo_request_id)
    app[CACHE] = cache
    app[METRICS] = metrics
    app[EVICTOR] = evictor
    app[STATS] = stats
    separate = config.server.admin_listen is not None
    # On the registry port the page shows repository names only to those
    # who may pull (auth.htpasswd); the admin listener is guarded by where
    # it listens and admin_allow_from, like /metrics.
    status = StatusPage(
        cache, metrics, stats, windows=windows, gate=None if separate else auth
    )
    add_routes(app, handlers, operations=not separate, status=status)
    if separate:
        app[ADMIN] = _admin_app(config, handlers, metrics, status)
    current = config

    def reload(new: Config) -> list[str]:
        """Apply what can change live and log every changed key, old and
        new value; returns the changed keys that need a restart."""
        nonlocal current
        by_host = {r.host: r for r in new.registry_configs()}
        for served_registry in served:
            settings = by_host.get(served_registry.name)
            if settings is not None:
                _apply_registry(served_registry, clients[settings.host], settings)
        evictor.max_size = new.cache.max_size
        evictor.min_free = new.cache.min_free
        evictor.low_watermark = new.cache.low_watermark
        evictor.interval = new.cache.eviction_interval
        logging.getLogger("mirror").setLevel(new.log.level.upper())
        evictor.trigger()
        restart = []
        # At WARNING, so that log.level = warning still shows what an
        # operator changed; after the new level applies.
        for change in changes(current, new):
            if change.key in RELOADABLE_KEYS or (
                change.registry_key in RELOADABLE_REGISTRY_KEYS
            ):
                log.warning("reload: %s", change)
            else:
                restart.append(change.key)
                log.warning("reload: %s (takes effect after a restart)", change)
        current = new
        return restart

    app[RELOAD] = reload

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await metadata.open()
            stack.push_async_callback(metadata.close)
            await blobs.open()
            await reconcile(metadata, blobs, clock())
            await evictor.load()
            await pools.open()
            stack.push_async_callback(pools.close)
            for client in clients.values():
                await client.open()
                stack.push_async_callback(client.close)
            flusher = asyncio.create_task(_housekeeping(metadata, cache, evictor))
            stack.push_async_callback(_cancel, flusher)
            worker = asyncio.create_task(evictor.run())
            stack.push_async_callback(_cancel, worker)
            stack.push_async_callback(cache.close)
            evictor.trigger()  # the budget may have shrunk while we were down
            for settings in config.registry_configs():
                log.info(
                    "mirroring %s from %s (%s)",
                    settings.host,
                    settings.upstream.url,
                    "with credentials" if settings.upstream.username else "anonymously",
                )
            log.info("caching into %s", config.cache.dir)
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
        admin=app.get(ADMIN),
    )


def _admin_app(
    config: Config, handlers: RegistryHandlers, metrics: Metrics, status: StatusPage
) -> web.Application:
    """The operations endpoints on a listener of their own, with its own
    allow-list (server.admin_allow_from)."""
    middlewares = []
    if config.server.admin_allow_from:
        policy = ClientPolicy(metrics, allow_from=config.server.admin_allow_from)
        middlewares.append(client_middleware(policy))
    admin = web.Application(middlewares=[*middlewares, error_middleware])
    add_operations_routes(admin, handlers, status)
    admin.router.add_route("*", "/{tail:.*}", handlers.unsupported)
    return admin


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


def _window(client: UpstreamClient) -> Callable[[], int | None]:
    """The client's rate-limit window in seconds, once upstream said it."""
    return lambda: client.ratelimit.budget.window


def _free_bytes(path: Path) -> float:
    """Free bytes on `path`'s file system; NaN when it cannot be read."""
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return math.nan


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _apply_registry(
    registry: Registry, client: UpstreamClient, settings: RegistryConfig
) -> None:
    """Apply a registry's live keys (RELOADABLE_REGISTRY_KEYS)."""
    registry.tag_ttl = settings.tag_ttl
    registry.max_stale = settings.max_stale
    client.ratelimit.warn_below = settings.upstream.ratelimit_warn_below
