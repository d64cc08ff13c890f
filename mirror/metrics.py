"""Every Prometheus collector mirror exports, on a per-app registry.

Labels stay low-cardinality on purpose: route, method, status, kind and
result, and `registry`, whose values come only from the configuration; never
a repository or a digest.
"""

from __future__ import annotations

import platform
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from mirror import __revision__, __version__

_Collector = TypeVar("_Collector", Counter, Gauge, Histogram)

# A `_created` series per counter doubles what a scrape carries and no
# dashboard or alert reads it.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The `cache` label of request metrics: what the cache did for a request.
# hit: served from the cache; miss: fetched from upstream; joined: attached
# to a fetch in flight; stale: cached content served because upstream
# failed; uncached: relayed without being stored (tags/list, a blob too
# large for the budget or the disk); none: no cache lookup (/v2/, errors).
CACHE_RESULTS = ("hit", "miss", "joined", "stale", "uncached", "none")


class Metrics:
    """Owns the collectors; `registry` is what /metrics renders."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (open fds, RSS, CPU, start time) and python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "mirror_build_info",
            "Always 1; the labels say which mirror is running.",
            ["version", "revision", "python"],
            registry=r,
        )
        self.build_info.labels(
            __version__, __revision__, platform.python_version()
        ).set(1)
        self.ready = Gauge(
            "mirror_ready",
            "1 while /readyz answers 200, else 0.",
            registry=r,
        )
        self.http_requests = Counter(
            "mirror_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mirror_http_request_duration_seconds",
            "Time to answer a request, headers to last byte, by route and "
            "cache result (hit, miss, joined, stale, uncached, none).",
            ["route", "cache"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
            registry=r,
        )
        self.cache_requests = Counter(
            "mirror_cache_requests",
            "Cache lookups by kind (blob, manifest, tag) and result "
            "(hit, miss, joined: attached to a download in flight, "
            "stale: served from cache because upstream failed).",
            ["registry", "kind", "result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent upstream, by kind and result (HTTP status or error).",
            ["registry", "kind", "result"],
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "mirror_upstream_first_byte_seconds",
            "Time from sending an upstream request to its response headers, "
            "by kind (each redirect and auth round trip is one request).",
            ["registry", "kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.upstream_throttled = Gauge(
            "mirror_upstream_throttled",
            "1 while the mirror asks upstream for no pulls after a 429 "
            "(until Retry-After or the window passes), else 0.",
            ["registry"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes",
            "Body bytes received from upstream, by kind.",
            ["registry", "kind"],
            registry=r,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes",
            "Blob bytes sent to clients, by source (cache: from disk, an "
            "upstream download saved; upstream: while downloading).",
            ["source"],
            registry=r,
        )
        self.downloads_in_progress = Gauge(
            "mirror_blob_downloads_in_progress",
            "Blobs being fetched from upstream right now.",
            registry=r,
        )
        self.verification_failures = Counter(
            "mirror_verification_failures",
            "Upstream content rejected because its digest or size was wrong, "
            "or its body was cut short, by kind.",
            ["registry", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "mirror_upstream_retries",
            "Upstream requests retried after a connection error or 5xx, by kind.",
            ["registry", "kind"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "mirror_upstream_up",
            "1 while upstream answers; 0 after a request failed every retry "
            "(requests then fail fast for upstream.down_backoff).",
            ["registry"],
            registry=r,
        )
        self.upstream_auth_failures = Counter(
            "mirror_upstream_auth_failures",
            "Upstream authentication failures by reason (rejected: the "
            "configured credentials; denied: anonymous refused; "
            "untrusted_realm: a realm not trusted with credentials).",
            ["registry", "reason"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "Pulls allowed per window, from upstream's ratelimit-limit header.",
            ["registry"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the window, from upstream's ratelimit-remaining "
            "header (0 after a 429).",
            ["registry"],
            registry=r,
        )
        self.blob_resumes = Counter(
            "mirror_blob_resumes",
            "Blob downloads resumed with a Range request after upstream cut them.",
            ["registry"],
            registry=r,
        )
        self.cache_size = Gauge(
            "mirror_cache_size_bytes",
            "Bytes of blobs in the cache.",
            registry=r,
        )
        self.cache_max_size = Gauge(
            "mirror_cache_max_size_bytes",
            "The cache's size budget, cache.max_size.",
            registry=r,
        )
        self.cache_min_free = Gauge(
            "mirror_cache_min_free_bytes",
            "Free disk space eviction keeps, cache.min_free.",
            registry=r,
        )
        self.disk_free = Gauge(
            "mirror_cache_disk_free_bytes",
            "Free space on cache.dir's file system, read at each scrape.",
            registry=r,
        )
        self.cache_blobs = Gauge(
            "mirror_cache_blobs",
            "Blobs in the cache.",
            registry=r,
        )
        self.evictions = Counter(
            "mirror_evictions",
            "Blobs removed by the eviction worker.",
            registry=r,
        )
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes",
            "Bytes removed by the eviction worker.",
            registry=r,
        )
        self.uncached_downloads = Counter(
            "mirror_uncached_downloads",
            "Blobs streamed to clients without being cached, by reason "
            "(too_large: bigger than cache.max_size; disk_full: the disk "
            "filled up mid-download).",
            ["reason"],
            registry=r,
        )
        self.upstream_invalid = Counter(
            "mirror_upstream_invalid_responses",
            "Upstream responses refused because of what they carried, by "
            "reason (media_type, encoding, too_large, manifest, token, "
            "token_realm, redirect).",
            ["registry", "reason"],
            registry=r,
        )
        self.downloads_queued = Gauge(
            "mirror_blob_downloads_queued",
            "Blob downloads waiting for one of upstream.max_downloads slots.",
            registry=r,
        )
        self.download_memory = Gauge(
            "mirror_blob_download_memory_bytes",
            "Blob bytes downloads hold in memory ahead of the disk (or, "
            "uncached, of their slowest reader); upstream.download_memory "
            "bounds it.",
            registry=r,
        )
        self.download_queue_wait = Histogram(
            "mirror_blob_download_queue_wait_seconds",
            "Time a blob download waited for a slot before it started.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self.http_connections = Gauge(
            "mirror_http_connections",
            "Client connections open right now.",
            registry=r,
        )
        self.http_connections_rejected = Counter(
            "mirror_http_connections_rejected",
            "Client connections not served, by reason (limit: answered 503 "
            "and closed, server.max_connections reached; fds: accept() "
            "failed for lack of file descriptors, counted per attempt).",
            ["reason"],
            registry=r,
        )
        for reason in ("limit", "fds"):
            self.http_connections_rejected.labels(reason)
        self.http_bad_requests = Counter(
            "mirror_http_bad_requests",
            "Connections that sent no valid HTTP request, by reason "
            "(malformed: answered 400; tls_on_plain: a TLS handshake on the "
            "plain-HTTP port, closed).",
            ["reason"],
            registry=r,
        )
        self.client_refusals = Counter(
            "mirror_client_refusals",
            "Requests refused for who sent them, by reason (address: not in "
            "server.allow_from, 403; busy: server.max_requests_per_client "
            "in flight already, 429).",
            ["reason"],
            registry=r,
        )
        self.client_auth = Counter(
            "mirror_client_auth",
            "Client logins checked against auth.htpasswd, by result (verified: "
            "bcrypt said yes; cached: a recently verified login; missing: no "
            "credentials; rejected: wrong ones; throttled: refused for too "
            "many failures from the address).",
            ["result"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "mirror_tls_reloads",
            "Reloads of the listener's TLS certificate (SIGHUP, or the files "
            "changed), by result (ok; failed: the old certificate stays).",
            ["result"],
            registry=r,
        )
        self.repository_denials = Counter(
            "mirror_repository_denials",
            "Requests refused with 403 DENIED by a registry's allow/deny rules.",
            ["registry"],
            registry=r,
        )
        self.http_send_timeouts = Counter(
            "mirror_http_send_timeouts",
            "Responses abandoned because the client accepted no bytes for "
            "server.send_timeout.",
            registry=r,
        )


class Children(Generic[_Collector]):
    """A collector's children, each looked up once, with leading label values
    (`prefix`, such as a registry's name) filled in.

    prometheus_client's `labels()` takes a lock and builds a key on every
    call, and some of these count every request. For label values from
    mirror's code (routes, kinds, results, statuses): there are few, and no
    child is ever removed.
    """

    def __init__(self, collector: _Collector, *prefix: str) -> None:
        self._collector: _Collector = collector
        self._prefix = prefix
        self._children: dict[tuple[str, ...], _Collector] = {}

    def labels(self, *values: str) -> _Collector:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._collector.labels(
                *self._prefix, *values
            )
        return child


class RegistryMetrics:
    """The collectors of one registry, its `registry` label bound: what an
    UpstreamClient, its TokenAuth, RateLimit, its downloads and the cache's
    lookups through it count."""

    def __init__(self, metrics: Metrics, registry: str) -> None:
        self.registry = registry
        self.requests = Children(metrics.upstream_requests, registry)
        self.bytes = Children(metrics.upstream_bytes, registry)
        self.retries = Children(metrics.upstream_retries, registry)
        self.invalid = Children(metrics.upstream_invalid, registry)
        self.auth_failures = Children(metrics.upstream_auth_failures, registry)
        self.verification_failures = Children(metrics.verification_failures, registry)
        self.cache_requests = Children(metrics.cache_requests, registry)
        # Created on first use: a gauge of a budget no header has told yet
        # would claim a limit of 0.
        self.ratelimit_limit = Children(metrics.ratelimit_limit, registry)
        self.ratelimit_remaining = Children(metrics.ratelimit_remaining, registry)
        self.first_byte = Children(metrics.upstream_first_byte, registry)
        # Failures an alert watches exist at 0 from the start, so that the
        # first one is an increase Prometheus can see.
        for kind in ("manifest", "blob"):
            self.verification_failures.labels(kind)
        for reason in ("rejected", "denied", "untrusted_realm"):
            self.auth_failures.labels(reason)
        self.up = metrics.upstream_up.labels(registry)
        self.throttled = metrics.upstream_throttled.labels(registry)
        self.denials = metrics.repository_denials.labels(registry)
        self.blob_resumes = metrics.blob_resumes.labels(registry)
