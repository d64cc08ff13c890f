"""The route table and the request-metrics middleware."""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from mirror import outcome
from mirror.api.errors import Handler
from mirror.api.handlers import RegistryHandlers
from mirror.api.routing import ROUTE
from mirror.api.status import StatusPage
from mirror.metrics import Children, Metrics
from mirror.outcome import Outcome
from mirror.stats import Stats

# What the request did (cache result, registry, bytes sent by sendfile), for
# the access log.
OUTCOME = web.RequestKey("outcome", Outcome)
REQUEST_ID_HEADER = "X-Request-Id"
# A client's (or a proxy's) request id is kept only if it is this plain.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BodyBytes:
    """Counts the body bytes aiohttp's writer sends for one response (its
    `on_body_write` hook): not the headers nor chunk framing, which the
    writer's own count includes, and not sendfile's (Outcome.sent)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, size: int, _total: int) -> None:
        self.count += size


BODY_BYTES = web.RequestKey("body_bytes", BodyBytes)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Middleware = Any  # aiohttp's middleware type is not exported in a stable form

# A repository name has slashes; the regex is greedy, so the last
# "/manifests/" (or "/blobs/", "/tags/") in the path splits name from the rest.
_NAME = "{name:.+}"


async def _ignore_expect(request: web.Request) -> None:
    """No route reads a request body, so `Expect` needs no answer (aiohttp's
    default answers an unknown one with a plain-text 417)."""


def add_routes(
    app: web.Application,
    handlers: RegistryHandlers,
    *,
    operations: bool = True,
    status: StatusPage | None = None,
) -> None:
    """The registry API, and with `operations` /metrics, /healthz and
    /readyz (and the `status` page at / and /status.json) too, unless they
    have a listener of their own."""

    def get(path: str, handler: Handler, name: str | None = None) -> None:
        app.router.add_get(path, handler, name=name, expect_handler=_ignore_expect)

    get("/v2/", handlers.base, "base")
    get("/v2", handlers.base)
    get(f"/v2/{_NAME}/manifests/{{reference}}", handlers.manifest, "manifest")
    get(f"/v2/{_NAME}/blobs/{{digest}}", handlers.blob, "blob")
    get(f"/v2/{_NAME}/tags/list", handlers.tags, "tags")
    get(f"/v2/{_NAME}/referrers/{{digest}}", handlers.referrers, "referrers")
    if operations:
        add_operations_routes(app, handlers, status)
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


def add_operations_routes(
    app: web.Application, handlers: RegistryHandlers, status: StatusPage | None = None
) -> None:
    """/metrics, /healthz and /readyz, and with `status` / and /status.json;
    every other path is a 404 NOT_FOUND."""
    routes: list[tuple[str, Handler, str]] = [
        ("/metrics", handlers.metrics_page, "metrics"),
        ("/healthz", handlers.healthz, "healthz"),
        ("/readyz", handlers.readyz, "readyz"),
    ]
    if status is not None:
        routes.append(("/", status.html, "status"))
        routes.append(("/status.json", status.json, "status_json"))
    for path, handler, name in routes:
        app.router.add_get(path, handler, name=name, expect_handler=_ignore_expect)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request id in an `X-Request-Id` header, so a
    client's report can be matched to its access-log line."""
    done = request.get(OUTCOME)
    if done is not None:
        response.headers[REQUEST_ID_HEADER] = done.id


def metrics_middleware(metrics: Metrics, stats: Stats | None = None) -> Middleware:
    """Count every request by route name, method and status, and time it by
    route and cache result; start its Outcome (OUTCOME on the request).
    `stats` (the status page's history) gets the same cache result, and
    each manifest served to a GET."""
    requests = Children(metrics.http_requests)
    durations = Children(metrics.http_duration)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        started = time.perf_counter()
        done = request[OUTCOME] = outcome.begin()
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is not None and _REQUEST_ID_RE.fullmatch(given):
            done.id = given
        body = request[BODY_BYTES] = BodyBytes()
        request.writer.on_body_write = body
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            # Any token is a method to HTTP; keep the label set bounded.
            method = request.method if request.method in _METHODS else "other"
            requests.labels(route, method, str(status)).inc()
            durations.labels(route, done.cache or "none").observe(
                time.perf_counter() - started
            )
            if stats is not None:
                stats.answered(done.cache)
                target = request.get(ROUTE)
                if route == "manifest" and method == "GET" and status == 200 and target:
                    stats.pulled(target.registry.name, target.repository)

    return middleware
