"""The route table and the request-metrics middleware."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from mirror.api.errors import Handler
from mirror.api.handlers import RegistryHandlers
from mirror.metrics import Metrics

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Middleware = Any  # aiohttp's middleware type is not exported in a stable form

# A repository name has slashes; the regex is greedy, so the last
# "/manifests/" (or "/blobs/", "/tags/") in the path splits name from the rest.
_NAME = "{name:.+}"


def add_routes(app: web.Application, handlers: RegistryHandlers) -> None:
    r = app.router
    r.add_get("/v2/", handlers.base, name="base")
    r.add_get("/v2", handlers.base)
    r.add_get(
        f"/v2/{_NAME}/manifests/{{reference}}", handlers.manifest, name="manifest"
    )
    r.add_get(f"/v2/{_NAME}/blobs/{{digest}}", handlers.blob, name="blob")
    r.add_get(f"/v2/{_NAME}/tags/list", handlers.tags, name="tags")
    r.add_get("/metrics", handlers.metrics_page, name="metrics")
    r.add_get("/healthz", handlers.healthz, name="healthz")
    r.add_get("/readyz", handlers.readyz, name="readyz")
    # Everything else under /v2/: 405 UNSUPPORTED for writes, 404 for reads.
    r.add_route("*", "/v2/{tail:.*}", handlers.unsupported, name="unsupported")


def metrics_middleware(metrics: Metrics) -> Middleware:
    """Count and time every request by route name, method and status."""
    # labels() costs a lock and a tuple lookup per call; the combinations are
    # few, so the children are looked up once and kept.
    counters: dict[tuple[str, str, int], Any] = {}
    timers: dict[str, Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            # Any token is a method to HTTP; keep the label set bounded.
            method = request.method if request.method in _METHODS else "other"
            key = (route, method, status)
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = metrics.http_requests.labels(
                    route, method, str(status)
                )
            counter.inc()
            timer = timers.get(route)
            if timer is None:
                timer = timers[route] = metrics.http_duration.labels(route)
            timer.observe(time.perf_counter() - started)

    return middleware
