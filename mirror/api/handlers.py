"""Thin request handlers: parse and check input, ask the cache, write HTTP.

Nothing here decides what is cached; that is `PullThroughCache`. Input is
validated against the distribution grammar before anything else happens.

Blob bodies are sent by us, not by aiohttp's FileResponse, so that both
paths (a cached file, a download in flight) answer Range the same way and
both give up on a client that stops reading: no write may wait longer than
`send_timeout` for the client to make room.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from typing import BinaryIO

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from mirror import outcome
from mirror.api.errors import API_VERSION_HEADER
from mirror.api.routing import Router
from mirror.download import SEND_CHUNK, FileSpan, Reader
from mirror.errors import (
    MirrorError,
    Overloaded,
    RangeNotSatisfiable,
    Unsupported,
)
from mirror.logutil import OncePer
from mirror.metrics import Metrics
from mirror.proxy import CachedBlob, Manifest, PullThroughCache
from mirror.reference import parse_digest, parse_reference

log = logging.getLogger(__name__)

# A cached blob is sent with sendfile in pieces, each sized to about this
# long at the client's pace so far (within the bounds below): a piece that
# takes send_timeout means the client stopped reading.
_PIECE_SECONDS = 1.0
_MIN_PIECE = 256 * 1024
_MAX_PIECE = 16 * 1024 * 1024
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)

STALE_HEADER = "X-Mirror-Stale"
CACHE_HEADER = "X-Mirror-Cache"
TAGS_PARAMS = ("n", "last")


class RegistryHandlers:
    """The /v2/ endpoints and /metrics, over one PullThroughCache."""

    def __init__(
        self, cache: PullThroughCache, metrics: Metrics, *, send_timeout: float = 60.0
    ) -> None:
        self.cache = cache
        self.router = Router(cache.registries)
        self.metrics = metrics
        self.send_timeout = send_timeout
        self._fd_warning = OncePer(60.0)

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_VERSION_HEADER)

    async def manifest(self, request: web.Request) -> web.Response:
        route = self.router.route(request)
        reference = parse_reference(request.match_info["reference"])
        head = request.method == "HEAD"
        manifest = await self.cache.manifest(
            route.registry, route.repository, reference, body=not head
        )
        headers = _manifest_headers(manifest)
        done = outcome.current()
        if done is not None and done.cache is not None:
            headers[CACHE_HEADER] = done.cache
        return web.Response(body=None if head else manifest.body, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        route = self.router.route(request)
        digest = parse_digest(request.match_info["digest"])
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            size = await self.cache.blob_size(route.registry, route.repository, digest)
            if size is not None:
                headers["Content-Length"] = str(size)
            return web.Response(headers=headers)

        # Pinned for the whole response: eviction leaves it alone meanwhile.
        with self.cache.pins.pinned(str(digest)):
            source = await self.cache.blob(route.registry, route.repository, digest)
            if isinstance(source, CachedBlob):
                headers[CACHE_HEADER] = "hit"
                return await self._send_cached(request, source, headers)
            done = outcome.current()
            headers[CACHE_HEADER] = done.cache if done and done.cache else "miss"
            try:
                return await self._stream_download(request, source, headers)
            finally:
                source.close()
                if done is not None and not source.download.cached:
                    done.note_cache("uncached")

    async def _send_cached(
        self, request: web.Request, blob: CachedBlob, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a cached file (or the requested range of it) with sendfile.

        Raises RangeNotSatisfiable, Overloaded (out of file descriptors).
        """
        requested = _byte_range(request.headers.get("Range"), blob.size)
        start, end = requested or (0, blob.size)
        try:
            # Inline, like the stat that found it: opening a cached dentry
            # takes microseconds, and a handler cancelled (its client gone)
            # while a thread opened the file would leak the descriptor.
            file = open(blob.path, "rb")  # noqa: ASYNC230, SIM115 - see above
        except OSError as exc:
            if exc.errno in _OUT_OF_FDS:
                if self._fd_warning.ready():
                    log.warning("out of file descriptors serving cached blobs: %s", exc)
                raise Overloaded("mirror is out of file descriptors") from None
            raise
        try:
            response = _blob_response(headers, requested, blob.size)
            await response.prepare(request)
            served = self.metrics.served_bytes.labels("cache")
            await self._sendfile(request, response, file, start, end, served)
            await response.write_eof()
        except TimeoutError:
            self._stalled(request, "cached blob")
        except ConnectionError:
            pass  # the client is gone
        finally:
            file.close()
        return response

    async def _sendfile(
        self,
        request: web.Request,
        response: web.StreamResponse,
        file: BinaryIO,
        start: int,
        end: int,
        served: Counter,
        *,
        shared: bool = False,
    ) -> None:
        """sendfile [start, end) in pieces sized to the client's pace.

        A `shared` file (a download's, read by every client of it) is never
        read at its position: where sendfile cannot be used, the rest is
        copied with pread, not with asyncio's fallback (which seeks).

        Raises ConnectionError (client gone, or the file ended early: the
        connection is aborted) or TimeoutError (a piece took send_timeout:
        the client stalled).
        """
        loop = asyncio.get_running_loop()
        offset, piece = start, _MIN_PIECE
        while offset < end:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client left")
            count = min(piece, end - offset)
            began = loop.time()
            try:
                async with asyncio.timeout(self.send_timeout):
                    sent = await loop.sendfile(
                        transport, file, offset, count, fallback=not shared
                    )
            except asyncio.SendfileNotAvailableError:
                await self._copy(response, file, offset, end, served)
                return
            done = outcome.current()
            if done is not None:
                done.sent += sent
            served.inc(sent)
            if sent < count:
                transport.abort()
                raise ConnectionResetError("the file ended before the response")
            offset += count
            rate = count / max(loop.time() - began, 1e-6)
            piece = int(min(_MAX_PIECE, max(_MIN_PIECE, rate * _PIECE_SECONDS)))

    async def _copy(
        self,
        response: web.StreamResponse,
        file: BinaryIO,
        start: int,
        end: int,
        served: Counter,
    ) -> None:
        """Send [start, end) of `file` through the response, read with
        pread in pieces."""
        offset = start
        while offset < end:
            length = min(SEND_CHUNK, end - offset)
            data = await asyncio.to_thread(os.pread, file.fileno(), length, offset)
            if not data:
                raise ConnectionResetError("the file ended before the response")
            await self._write(response, data, served)
            offset += len(data)

    async def _write(
        self, response: web.StreamResponse, data: bytes | memoryview, served: Counter
    ) -> None:
        """Write and count a piece of a blob; TimeoutError if the client took
        none of it for send_timeout."""
        async with asyncio.timeout(self.send_timeout):
            await response.write(data)
        served.inc(len(data))

    def _stalled(self, request: web.Request, what: str) -> None:
        """The client accepted nothing for send_timeout: drop it."""
        self.metrics.http_send_timeouts.inc()
        log.info(
            "dropped client %s: it read nothing of a %s for %ss",
            request.remote,
            what,
            self.send_timeout,
        )
        if request.transport is not None:
            request.transport.abort()

    async def _stream_download(
        self, request: web.Request, download: Reader, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a blob while it downloads; abort the response if it fails."""
        size = download.size
        requested = None
        if size is not None:
            requested = _byte_range(request.headers.get("Range"), size)
            response = _blob_response(headers, requested, size)
        else:
            response = web.StreamResponse(headers=headers)
        # Without a range: the whole blob, complete only once verified.
        start, end = requested or (0, None)
        served = self.metrics.served_bytes.labels("upstream")
        # What is already on disk goes out with sendfile, unless the body is
        # chunked (unknown size) or TLS-encrypted, which sendfile cannot do.
        spans = size is not None and not _is_tls(request)
        try:
            # Inside the try: a client that reset while we waited for the
            # first byte makes prepare() raise ConnectionResetError.
            await response.prepare(request)
            async for chunk in download.stream(start, end, spans=spans):
                if isinstance(chunk, FileSpan):
                    at, until = chunk.offset, chunk.offset + chunk.count
                    await self._sendfile(
                        request, response, chunk.file, at, until, served, shared=True
                    )
                    continue
                await self._write(response, chunk, served)
        except TimeoutError:
            self._stalled(request, "blob download")
            return response
        except ConnectionError:
            log.info("client %s left during blob %s", request.remote, download.digest)
            return response
        except (MirrorError, OSError) as exc:
            # The download failed, or sendfile did past its first byte.
            # Headers are gone; the only honest signal left is to cut the
            # connection before the declared length.
            log.warning(
                "aborting response for blob %s to %s: %s",
                download.digest,
                request.remote,
                exc.message if isinstance(exc, MirrorError) else exc,
            )
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def tags(self, request: web.Request) -> web.Response:
        route = self.router.route(request)
        params = {k: request.query[k] for k in TAGS_PARAMS if k in request.query}
        result = await self.cache.list_tags(route.registry, route.repository, params)
        outcome.note_cache(route.registry.name, "uncached")
        headers = dict(API_VERSION_HEADER)
        if result.link:
            headers["Link"] = route.link(result.link)
        return web.Response(
            status=result.status,
            body=result.body,
            headers={**headers, "Content-Type": result.content_type},
        )

    async def referrers(self, request: web.Request) -> web.Response:
        """OCI 1.1 referrers of a digest, relayed (see PullThroughCache)."""
        route = self.router.route(request)
        digest = parse_digest(request.match_info["digest"])
        params = {k: v for k, v in request.query.items() if k != "ns"}
        result = await self.cache.referrers(
            route.registry, route.repository, digest, params
        )
        headers = {**API_VERSION_HEADER, "Content-Type": result.media_type}
        if result.filters:
            headers["OCI-Filters-Applied"] = result.filters
        if result.link:
            headers["Link"] = route.link(result.link)
        if result.stale:
            headers[STALE_HEADER] = "1"
        return web.Response(body=result.body, headers=headers)

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


def _is_tls(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


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


def _blob_response(
    headers: dict[str, str], requested: tuple[int, int] | None, size: int
) -> web.StreamResponse:
    """A 200 for the whole blob, or a 206 for the [start, end) requested."""
    response = web.StreamResponse(headers=headers)
    if requested is None:
        response.content_length = size
        return response
    start, end = requested
    response.set_status(206)
    response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    return response


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single byte range against `size`; None without a
    Range header.

    Raises RangeNotSatisfiable for a malformed range, several ranges, or one
    outside the blob (including the empty suffix `bytes=-0`).
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header)
    if match is None or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(size)
    first, last = match.group(1), match.group(2)
    if first == "":  # bytes=-N: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - length), size
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= stop:
        raise RangeNotSatisfiable(size)
    return start, stop
