"""Thin request handlers: parse and check input, ask the cache, write HTTP.

Nothing here decides what is cached; that is `PullThroughCache`. Input is
validated against the distribution grammar before anything else happens.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirror.api.errors import API_VERSION_HEADER
from mirror.download import Reader
from mirror.errors import MirrorError, NameUnknown, RangeNotSatisfiable, Unsupported
from mirror.metrics import Metrics
from mirror.proxy import CachedBlob, Manifest, PullThroughCache
from mirror.reference import parse_digest, parse_name, parse_reference

log = logging.getLogger(__name__)

# containerd tells a mirror which registry a request is for with ?ns=.
MIRRORED_NAMESPACES = frozenset({"docker.io", "registry-1.docker.io"})
STALE_HEADER = "X-Mirror-Stale"
CACHE_HEADER = "X-Mirror-Cache"
TAGS_PARAMS = ("n", "last")


class RegistryHandlers:
    """The /v2/ endpoints and /metrics, over one PullThroughCache."""

    def __init__(self, cache: PullThroughCache, metrics: Metrics) -> None:
        self.cache = cache
        self.metrics = metrics

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_VERSION_HEADER)

    async def manifest(self, request: web.Request) -> web.Response:
        name = _repository(request)
        reference = parse_reference(request.match_info["reference"])
        head = request.method == "HEAD"
        manifest = await self.cache.manifest(name, reference, body=not head)
        return web.Response(
            body=None if head else manifest.body,
            headers=_manifest_headers(manifest),
        )

    async def blob(self, request: web.Request) -> web.StreamResponse:
        name = _repository(request)
        digest = parse_digest(request.match_info["digest"])
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            size = await self.cache.blob_size(name, digest)
            if size is not None:
                headers["Content-Length"] = str(size)
            return web.Response(headers=headers)

        # Pinned for the whole response: eviction leaves it alone meanwhile.
        with self.cache.pins.pinned(str(digest)):
            source = await self.cache.blob(name, digest)
            if isinstance(source, CachedBlob):
                headers[CACHE_HEADER] = "hit"
                # FileResponse answers Range (206/416) and uses sendfile; it is
                # sent here, inside the pin, rather than after we return.
                response = _SentFileResponse(source.path, headers=headers)
                await response.prepare(request)
                self.metrics.served_bytes.labels("cache").inc(source.size)
                return response
            try:
                headers[CACHE_HEADER] = "miss"
                return await self._stream_download(request, source, headers)
            finally:
                source.close()

    async def _stream_download(
        self, request: web.Request, download: Reader, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a blob while it downloads; abort the response if it fails."""
        size = download.size
        start, end = 0, None  # the whole blob, complete only once verified
        response = web.StreamResponse(headers=headers)
        if size is not None and request.headers.get("Range"):
            start, end = _byte_range(request, size)
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if size is not None:
            response.content_length = (end or size) - start
        await response.prepare(request)
        served = self.metrics.served_bytes.labels("upstream")
        try:
            async for chunk in download.stream(start, end):
                await response.write(chunk)
                served.inc(len(chunk))
        except MirrorError as exc:
            # Headers are gone; the only honest signal left is to cut the
            # connection before the declared length.
            log.warning(
                "aborting response for blob %s to %s: %s",
                download.digest,
                request.remote,
                exc.message,
            )
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionError:
            log.info("client %s left during blob %s", request.remote, download.digest)
            return response
        await response.write_eof()
        return response

    async def tags(self, request: web.Request) -> web.Response:
        name = _repository(request)
        params = {k: request.query[k] for k in TAGS_PARAMS if k in request.query}
        result = await self.cache.list_tags(name, params)
        headers = dict(API_VERSION_HEADER)
        if result.link:
            headers["Link"] = result.link
        return web.Response(
            status=result.status,
            body=result.body,
            headers={**headers, "Content-Type": result.content_type},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process answers HTTP."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 when the mirror can do its job, else 503; JSON details."""
        ready, details = self.cache.readiness()
        return web.json_response(
            {"ready": ready, **details}, status=200 if ready else 503
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def unsupported(self, request: web.Request) -> web.Response:
        if request.method in ("GET", "HEAD"):
            raise web.HTTPNotFound()
        raise Unsupported(
            "this mirror is read-only: the operation is unsupported",
            {"method": request.method},
        )


def _repository(request: web.Request) -> str:
    """The normalised repository name; rejects registries we do not mirror."""
    ns = request.query.get("ns")
    if ns is not None and ns not in MIRRORED_NAMESPACES:
        raise NameUnknown("this mirror serves docker.io only", {"ns": ns})
    return parse_name(request.match_info["name"])


def _manifest_headers(manifest: Manifest) -> dict[str, str]:
    headers = {
        **API_VERSION_HEADER,
        "Content-Type": manifest.media_type,
        "Docker-Content-Digest": manifest.digest,
        "Content-Length": str(manifest.size),
        "Etag": f'"{manifest.digest}"',
    }
    if manifest.stale:
        headers[STALE_HEADER] = "1"
    return headers


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """[start, end) of a Range header against `size`.

    Raises RangeNotSatisfiable for a malformed or out-of-bounds range.
    """
    try:
        rng = request.http_range
    except ValueError:
        raise RangeNotSatisfiable(size) from None
    start, stop = rng.start or 0, rng.stop
    if start < 0:  # a suffix range, bytes=-N: the last N bytes
        start, stop = max(0, size + start), size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise RangeNotSatisfiable(size)
    return start, stop


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (to do it inside a pin).

    aiohttp prepares the returned response again after the handler; the stock
    FileResponse would reopen the file and try to send it twice.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)
