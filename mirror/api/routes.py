"""The route table and the request-metrics middleware."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from mirror import outcome
from mirror.api.errors import Handler
from mirror.api.handlers import RegistryHandlers
from mirror.metrics import Metrics
from mirror.outcome import Outcome

# What the request did (cache result, registry, bytes sent by sendfile), for
# the access log.
OUTCOME = web.RequestKey("outcome", Outcome)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Middleware = Any  # aiohttp's middleware type is not exported in a stable form

# A repository name has slashes; the regex is greedy, so the last
# "/manifests/" (or "/blobs/", "/tags/") in the path splits name from the rest.
_NAME = "{name:.+}"


async def _ignore_expect(request: web.Request) -> None:
    """No route reads a request body, so `Expect` needs no answer (aiohttp's
    default answers an unknown one with a plain-text 417)."""


def add_routes(
    app: web.Application, handlers: RegistryHandlers, *, operations: bool = True
) -> None:
    """The registry API, and with `operations` /metrics, /healthz and
    /readyz too (unless they have a listener of their own)."""

    def get(path: str, handler: Handler, name: str | None = None) -> None:
        app.router.add_get(path, handler, name=name, expect_handler=_ignore_expect)

    get("/v2/", handlers.base, "base")
    get("/v2", handlers.base)
    get(f"/v2/{_NAME}/manifests/{{reference}}", handlers.manifest, "manifest")
    get(f"/v2/{_NAME}/blobs/{{digest}}", handlers.blob, "blob")
    get(f"/v2/{_NAME}/tags/list", handlers.tags, "tags")
    get(f"/v2/{_NAME}/referrers/{{digest}}", handlers.referrers, "referrers")
    if operations:
        add_operations_routes(app, handlers)
    # Everything else under /v2/: 405 UNSUPPORTED for writes, 404 for reads.
    app.router.add_route(
        "*",
        "/v2/{tail:.*}",
        handlers.unsupported,
        name="unsupported",
        expect_handler=_ignore_expect,
    )
    # And everywhere else, so that no request falls through to aiohttp's
    # own answers (a plain-text 417 for an Expect it does not know, which
    # echoes the header), only to our OCI errors.
    app.router.add_route(
        "*", "/{tail:.*}", handlers.unsupported, expect_handler=_ignore_expect
    )


def add_operations_routes(app: web.Application, handlers: RegistryHandlers) -> None:
    """/metrics, /healthz and /readyz; every other path is a 404 NOT_FOUND."""
    for path, handler, name in (
        ("/metrics", handlers.metrics_page, "metrics"),
        ("/healthz", handlers.healthz, "healthz"),
        ("/readyz", handlers.readyz, "readyz"),
    ):
        app.router.add_get(path, handler, name=name, expect_handler=_ignore_expect)


def metrics_middleware(metrics: Metrics) -> Middleware:
    """Count every request by route name, method and status, and time it by
    route and cache result; start its Outcome (OUTCOME on the request)."""
    # labels() costs a lock and a tuple lookup per call; the combinations are
    # few, so the children are looked up once and kept.
    counters: dict[tuple[str, str, int], Any] = {}
    timers: dict[tuple[str, str], Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        started = time.perf_counter()
        done = request[OUTCOME] = outcome.begin()
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
            result = done.cache or "none"
            timer = timers.get((route, result))
            if timer is None:
                timer = timers[route, result] = metrics.http_duration.labels(
                    route, result
                )
            timer.observe(time.perf_counter() - started)

    return middleware
