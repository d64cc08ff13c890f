"""The status page: `GET /` (one self-contained HTML page) and `GET /status.json`.

Both show one snapshot, built per request by `StatusPage.snapshot()`:

* every number that /metrics also has (cache size and budget, blobs, free
  disk, downloads, pull budgets, upstream up/throttled, readiness) is read
  from the app's Prometheus registry in one collection, so the page and a
  scrape at the same moment agree by construction;
* what /metrics cannot carry (repository names, per-minute history, recent
  eviction passes) comes from `mirror.stats.Stats`;
* readiness problems and each registry's details from
  `PullThroughCache.readiness()`, as /readyz has them.

The HTML (`status.html`, package data) embeds the snapshot as JSON in a
`<script type="application/json">` block, with `<`, `>` and `&` escaped as
`\\u003c` and so on, so no value from a client or an upstream (repository
names) can close the block; its inline script renders it with `textContent`
only and refreshes it from `status.json` every few seconds. The response's
Content-Security-Policy allows nothing but that script and style (by hash),
`data:` images and requests to the page's own origin: the page loads nothing
from anywhere else, and works offline.

On the registry port with `auth.htpasswd` set, both need the same
credentials as `/v2/` (repository names say what an organisation runs); on
the admin listener they are guarded, like /metrics, by where that listener
is bound and `server.admin_allow_from`. See docs/status-page.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Protocol, cast

from aiohttp import web

from mirror import __revision__, __version__
from mirror.metrics import Metrics
from mirror.proxy import PullThroughCache
from mirror.stats import BUCKET_SECONDS, RESULTS, Stats

# The version of /status.json's layout: bumped only when a field changes
# meaning or goes away (new fields may appear without it).
SCHEMA = 1
TOP_SHOWN = 10
_TEMPLATE = "status.html"
_DATA_MARK = "{{STATUS_JSON}}"
_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_STYLE_RE = re.compile(r"<style>(.*?)</style>", re.DOTALL)
# What may not appear raw inside a <script> data block.
_SCRIPT_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
    | {"\u2029": "\\u2029"}
)
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Gate(Protocol):
    """Who may see the page (ClientAuth): None to go on, else the answer."""

    async def check(self, request: web.Request) -> web.StreamResponse | None: ...


class StatusPage:
    """The handlers of `/` and `/status.json` over one app's parts.

    `windows` gives each registry's rate-limit window in seconds, when
    upstream said it (the metrics carry only limit and remaining).
    """

    def __init__(
        self,
        cache: PullThroughCache,
        metrics: Metrics,
        stats: Stats,
        *,
        windows: Mapping[str, Callable[[], int | None]] | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self.stats = stats
        self.windows = dict(windows or {})
        self.gate = gate
        self._page: tuple[str, str] | None = None  # (template, CSP), read once

    async def html(self, request: web.Request) -> web.StreamResponse:
        refused = await self._refused(request)
        if refused is not None:
            return refused
        template, policy = self._template()
        data = json.dumps(self.snapshot(), separators=(",", ":"))
        body = template.replace(_DATA_MARK, data.translate(_SCRIPT_ESCAPES), 1)
        return web.Response(
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={
                **_NO_STORE,
                "Content-Security-Policy": policy,
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
        )

    async def json(self, request: web.Request) -> web.StreamResponse:
        refused = await self._refused(request)
        if refused is not None:
            return refused
        return web.json_response(self.snapshot(), headers=_NO_STORE)

    async def _refused(self, request: web.Request) -> web.StreamResponse | None:
        return None if self.gate is None else await self.gate.check(request)

    def _template(self) -> tuple[str, str]:
        """The page and its Content-Security-Policy, read at the first use."""
        if self._page is None:
            template = (
                resources.files(__package__)
                .joinpath(_TEMPLATE)
                .read_text(encoding="utf-8")
            )
            scripts = " ".join(_hash(s) for s in _SCRIPT_RE.findall(template))
            styles = " ".join(_hash(s) for s in _STYLE_RE.findall(template))
            policy = (
                f"default-src 'none'; script-src {scripts}; style-src {styles}; "
                "img-src data:; connect-src 'self'; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'none'"
            )
            self._page = template, policy
        return self._page

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows; the layout is docs/status-page.md's."""
        samples = _collect(self.metrics)

        def value(name: str, **labels: str) -> float | None:
            found = samples.get((name, tuple(sorted(labels.items()))))
            return None if found is None or math.isnan(found) else found

        def number(name: str, **labels: str) -> int | None:
            found = value(name, **labels)
            return None if found is None else int(found)

        ready, details = self.cache.readiness()
        now = self.stats.clock()
        minutes = self.stats.requests.minutes()
        hour = {r: sum(m.counts[r] for m in minutes) for r in RESULTS}
        lookups = sum(hour.values())
        return {
            "schema": SCHEMA,
            "time": now,
            "version": __version__,
            "revision": __revision__,
            "started": self.stats.started,
            "uptime_seconds": round(max(0.0, now - self.stats.started), 1),
            "ready": ready,
            "problems": list(cast(list[str], details["problems"])),
            "registries": self._registries(details, value, number),
            "cache": {
                "size_bytes": number("mirror_cache_size_bytes"),
                "max_size_bytes": number("mirror_cache_max_size_bytes"),
                "blobs": number("mirror_cache_blobs"),
                "disk_free_bytes": number("mirror_cache_disk_free_bytes"),
                "min_free_bytes": number("mirror_cache_min_free_bytes"),
                "evictions": number("mirror_evictions_total"),
                "evicted_bytes": number("mirror_evicted_bytes_total"),
            },
            "downloads": {
                "in_progress": number("mirror_blob_downloads_in_progress"),
                "queued": number("mirror_blob_downloads_queued"),
            },
            "served_bytes": {
                source: number("mirror_served_bytes_total", source=source) or 0
                for source in ("cache", "upstream")
            },
            "requests": {
                "bucket_seconds": BUCKET_SECONDS,
                "totals": self.stats.requests.totals(),
                "last_hour": {
                    **hour,
                    "lookups": lookups,
                    "hit_ratio": round(hour["hit"] / lookups, 4) if lookups else None,
                },
                "minutes": [{"start": m.start, **m.counts} for m in minutes],
            },
            "top_repositories": [
                {"registry": registry, "repository": repository, "pulls": count}
                for registry, repository, count in self.stats.repositories.top(
                    TOP_SHOWN
                )
            ],
            "recent_evictions": [
                {
                    "time": p.time,
                    "blobs": p.blobs,
                    "bytes": p.bytes,
                    "size_after_bytes": p.size_after,
                }
                for p in self.stats.evictions()
            ],
        }

    def _registries(
        self,
        details: dict[str, object],
        value: Callable[..., float | None],
        number: Callable[..., int | None],
    ) -> list[dict[str, Any]]:
        registries = cast(dict[str, dict[str, Any]], details["registries"])
        result = []
        for name, status in registries.items():
            up = value("mirror_upstream_up", registry=name) != 0.0
            throttled = value("mirror_upstream_throttled", registry=name) == 1.0
            window = self.windows.get(name)
            result.append(
                {
                    "name": name,
                    "url": status["url"],
                    "identity": status["identity"],
                    "state": "down" if not up else "throttled" if throttled else "up",
                    "up": up,
                    "throttled": throttled,
                    "credentials_rejected": status["credentials_rejected"],
                    "down_for_seconds": status["down_for"],
                    "throttled_for_seconds": status["throttled_for"],
                    "budget": {
                        "limit": number(
                            "mirror_upstream_ratelimit_limit", registry=name
                        ),
                        "remaining": number(
                            "mirror_upstream_ratelimit_remaining", registry=name
                        ),
                        "window_seconds": None if window is None else window(),
                    },
                }
            )
        return result


def _collect(metrics: Metrics) -> Samples:
    """Every sample of the registry, as one scrape of /metrics sees them."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def _hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"
