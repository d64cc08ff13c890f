"""UpstreamClient: the registry API calls mirror makes to one upstream registry.

It speaks Registry HTTP API V2 to one upstream (Docker Hub, ghcr.io, ...):
manifest HEAD/GET, blob GET (following the 307 to a CDN; aiohttp drops the
Authorization header on a cross-origin redirect) and tags/list. It answers
auth challenges through `TokenAuth`, and turns every failure into the domain
exceptions of `mirror.errors`: nothing from aiohttp escapes except from the
body stream of an open blob response, which the caller reads.

Upstream is a peer that may misbehave, so what it sends is checked first:

* Two connection pools (`UpstreamPools`), shared by every registry's client
  so that adding registries does not multiply connections: blob downloads
  use their own (`max_downloads` connections), so manifest, tag and token
  requests never queue behind them (`max_connections`). Each client has its
  own sessions over them, with its own timeouts and TLS trust.
* Bodies read into memory (manifests, tag lists, tokens) stop at
  `max_body_size`, whatever Content-Length says, and are read to EOF however
  many reads the network splits them into.
* We ask for `Accept-Encoding: identity` and refuse any other encoding, so
  encoded bytes are never cached or relayed as if they were plain.
* Content-Type must be a media type by RFC 9110; manifest and tag requests
  never follow redirects (only blobs go to a CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from mirror.config import UpstreamConfig, small_blob_slots
from mirror.errors import (
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    UpstreamDenied,
    UpstreamDown,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from mirror.metrics import RegistryMetrics
from mirror.upstream.auth import Credentials, TokenAuth
from mirror.upstream.body import read_bounded
from mirror.upstream.ratelimit import MAX_THROTTLE, RateLimit
from mirror.upstream.retry import RetryPolicy
from mirror.values import bounded_seconds, media_type

log = logging.getLogger(__name__)

# Every manifest type a modern client understands, so upstream sends multi-arch
# indexes as they are instead of picking a platform for us.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
OCI_INDEX = MANIFEST_MEDIA_TYPES[0]
USER_AGENT = "mirror/0.1 (+pull-through cache)"
# Redirects followed for one request (registry.k8s.io sends one, a CDN one).
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Parts of an error message that may carry secrets: a URL's query (CDN
# signatures) and userinfo.
_URL_SECRETS = re.compile(r"(https?://)[^/\s'\"@]*@|\?[^\s'\"]*")


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """What a manifest HEAD tells: digest (may be None), type and size."""

    digest: str | None
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """How upstream looks from here, for readiness and operators."""

    url: str
    identity: str  # the account we pull as, or "anonymous"
    credentials_rejected: bool
    down_for: float  # seconds of failing fast left; 0 when up
    throttled_for: float  # seconds of rate-limit throttling left; 0 when not
    ratelimit_limit: int | None
    ratelimit_remaining: int | None


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An upstream response relayed as is (tags/list, referrers)."""

    status: int
    content_type: str
    body: bytes
    link: str | None
    filters: str | None = None  # OCI-Filters-Applied (referrers)


class BlobResponse:
    """An open upstream blob body starting at byte `offset` of the blob.

    `size` is the whole blob's size when upstream says it.
    """

    def __init__(
        self, response: aiohttp.ClientResponse, offset: int, size: int | None
    ) -> None:
        self.response = response
        self.offset = offset
        self.size = size
        self.content = response.content


class UpstreamPools:
    """The two connection pools all registries share; `open()` before the
    clients open, `close()` after they closed.

    Their limits bound the whole process: `max_connections` for manifest,
    tag and token requests, `max_downloads` (plus the small-blob lane) for
    blob downloads.
    """

    def __init__(self, max_connections: int, max_downloads: int) -> None:
        self._limits = (
            max_connections,
            max_downloads + small_blob_slots(max_downloads),
        )
        self._connectors: tuple[aiohttp.TCPConnector, aiohttp.TCPConnector] | None = (
            None
        )

    async def open(self) -> None:
        metadata, blobs = self._limits
        self._connectors = (
            aiohttp.TCPConnector(limit=metadata),
            aiohttp.TCPConnector(limit=blobs),
        )

    async def close(self) -> None:
        for connector in self._connectors or ():
            await connector.close()
        self._connectors = None

    def connector(self, *, blob: bool) -> aiohttp.TCPConnector:
        if self._connectors is None:
            raise RuntimeError("UpstreamPools used before open()")
        return self._connectors[1 if blob else 0]


class UpstreamClient:
    """Registry calls against `config.url`. `open()` before use, `close()` after.

    Idempotent requests are retried (see retry.py). After a request failed
    every attempt, upstream is considered down for `down_backoff` and requests
    fail at once, so clients get a quick 503 (and the cache serves what it
    has) instead of each waiting out the retries. After a 429, requests that
    would spend a pull (manifest GETs) fail at once with UpstreamRateLimited
    until the throttle passes. All of that state is this client's: one
    registry down or throttled leaves the others alone.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        metrics: RegistryMetrics,
        pools: UpstreamPools,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._pools = pools
        self._clock = clock
        self.name = metrics.registry
        self._session: aiohttp.ClientSession | None = None
        self._blob_session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True  # set by open()
        credentials = (
            Credentials(config.username, config.password) if config.username else None
        )
        self.auth = TokenAuth(
            self._token_get,
            metrics,
            upstream_url=config.url,
            credentials=credentials,
            trusted_realms=config.trusted_realms,
            max_body_size=config.max_body_size,
            clock=clock,
        )
        self.ratelimit = RateLimit(
            metrics, warn_below=config.ratelimit_warn_below, clock=clock
        )
        self._retry = RetryPolicy(
            config.retries, config.retry_backoff, config.retry_max_time
        )
        self._down_until = 0.0

    def _get_session(self, *, blob: bool = False) -> aiohttp.ClientSession:
        session = self._blob_session if blob else self._session
        if session is None:
            raise RuntimeError("UpstreamClient used before open()")
        return session

    def _token_get(
        self, url: str, params: list[tuple[str, str]], headers: dict[str, str]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """A GET to the token service, with this registry's TLS trust."""
        return self._get_session().get(
            url, params=params, headers=headers, allow_redirects=False, ssl=self._ssl
        )

    async def open(self) -> None:
        """Create the two sessions over the shared pools. Raises ssl.SSLError
        for a bad ca_file."""
        context = ssl.create_default_context()
        if self._config.ca_file is not None:
            context.load_verify_locations(cafile=self._config.ca_file)
        self._ssl = context
        self._session = self._new_session(blob=False)
        self._blob_session = self._new_session(blob=True)
        self._metrics.up.set(1)

    def _new_session(self, *, blob: bool) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._config.connect_timeout,
            sock_read=self._config.read_timeout,
        )
        return aiohttp.ClientSession(
            connector=self._pools.connector(blob=blob),
            connector_owner=False,
            timeout=timeout,
            # identity: a body is hashed and cached exactly as it arrives, so
            # it must arrive unencoded; see _check_encoding.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            auto_decompress=False,
        )

    async def close(self) -> None:
        for session in (self._session, self._blob_session):
            if session is not None:
                await session.close()
        self._session = self._blob_session = None

    def status(self) -> UpstreamStatus:
        budget = self.ratelimit.budget
        return UpstreamStatus(
            url=self._config.url,
            identity=self.auth.identity,
            credentials_rejected=self.auth.credentials_rejected,
            down_for=round(self.down_for, 1),
            throttled_for=self.ratelimit.throttled_for() or 0.0,
            ratelimit_limit=budget.limit,
            ratelimit_remaining=budget.remaining,
        )

    @property
    def down_for(self) -> float:
        """Seconds until upstream is tried again after failing (0: it is up)."""
        return max(0.0, self._down_until - self._clock())

    # --- requests -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        repository: str,
        path: str,
        kind: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        *,
        counted: bool = False,
        blob: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request, retried and authenticated; yields its response.

        The response yielded has a status below 500 other than 429, and no
        Content-Encoding; errors reading its body inside the block become
        UpstreamUnavailable. `counted`: the request spends a Docker Hub pull
        (a manifest GET). `blob`: use the blob pool and follow redirects (to
        a CDN); other requests are not redirected anywhere.

        Raises UpstreamUnavailable (unreachable, 5xx, or marked down),
        UpstreamRateLimited (429, or throttled), UpstreamDenied.
        """
        down_for = self.down_for
        if down_for:
            raise UpstreamDown(
                "upstream is failing; not asking again for a few seconds",
                {"retry_in": round(down_for, 1)},
            )
        throttled_for = self.ratelimit.throttled_for()
        if counted and throttled_for:
            raise UpstreamRateLimited(
                "upstream rate limit reached; content not in cache", throttled_for
            )
        url = f"{self._config.url}/v2/{repository}/{path}"
        try:
            async for attempt in self._retry.retrying(kind, self._metrics):
                with attempt:
                    resp = await self._send(
                        method, url, repository, kind, headers, params, blob=blob
                    )
        except UpstreamUnavailable:
            self._down_until = self._clock() + self._config.down_backoff
            self._metrics.up.set(0)
            log.warning(
                "upstream %s (%s) failed after retries; failing fast for %ss",
                self.name,
                self._config.url,
                self._config.down_backoff,
            )
            raise
        self._metrics.up.set(1)
        try:
            yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BodyCut(
                "upstream body cut short", {"error": describe_error(exc)}
            ) from exc
        finally:
            resp.release()

    async def _send(
        self,
        method: str,
        url: str,
        repository: str,
        kind: str,
        headers: dict[str, str] | None,
        params: dict[str, str] | None,
        *,
        blob: bool,
    ) -> aiohttp.ClientResponse:
        """Send once, following redirects (at most MAX_REDIRECTS) and
        answering one auth challenge per origin. See _request for errors."""
        session = self._get_session(blob=blob)
        scope = f"repository:{repository}:pull"
        answered: set[str] = set()  # origins whose challenge was answered
        redirects = 0
        while True:
            origin = _origin(url)
            send: CIMultiDict[str] = CIMultiDict(headers or {})
            auth = self.auth.header_for(origin, scope)
            if auth:
                send["Authorization"] = auth
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(self._config.first_byte_timeout):
                    resp = await session.request(
                        method,
                        url,
                        headers=send,
                        params=params,
                        allow_redirects=False,
                        ssl=self._ssl,
                    )
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                self._metrics.requests.labels(kind, "error").inc()
                raise UpstreamUnavailable(
                    "upstream unreachable", {"error": describe_error(exc)}
                ) from exc
            self._metrics.first_byte.labels(kind).observe(time.perf_counter() - sent)
            self._metrics.requests.labels(kind, str(resp.status)).inc()
            self.ratelimit.observe(resp.headers)
            challenge = resp.headers.get("WWW-Authenticate")
            if resp.status == 401 and challenge and origin not in answered:
                resp.release()
                answered.add(origin)
                await self.auth.authenticate(origin, challenge, scope)
                continue
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                resp.release()
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    self._invalid(
                        "redirect",
                        "upstream redirected too many times",
                        {"limit": MAX_REDIRECTS},
                    )
                url, params = self._redirect(url, resp.headers["Location"], kind), None
                continue
            if resp.status == 429:
                resp.release()
                wait = self.ratelimit.throttle(
                    bounded_seconds(
                        resp.headers.get("Retry-After"), maximum=MAX_THROTTLE
                    )
                )
                raise UpstreamRateLimited("upstream rate limit reached", wait)
            if resp.status >= 500:
                resp.release()
                raise UpstreamUnavailable("upstream failed", {"status": resp.status})
            if resp.status < 300:  # error bodies are never read
                try:
                    self._check_encoding(resp, kind)
                except UpstreamUnavailable:
                    resp.release()
                    raise
            return resp

    def _redirect(self, current: str, location: str, kind: str) -> str:
        """Where a redirect points, if it may be followed: an http(s) URL,
        never from https down to http, and no further than MAX_REDIRECTS.

        registry.k8s.io redirects every request to a regional registry, and
        Docker Hub its blobs to a CDN; the redirect target is asked like any
        upstream (manifests are verified against their digest all the same),
        with no Authorization unless it challenges us itself.
        Raises UpstreamUnavailable.
        """
        try:
            target = str(URL(current).join(URL(location)))
            parts = urlsplit(target)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            target, parts = "", urlsplit("")
        downgrade = current.startswith("https:") and parts.scheme != "https"
        if parts.scheme not in ("http", "https") or not parts.hostname or downgrade:
            log.warning(
                "upstream %s redirected a %s request to a URL not followed (%s)",
                self.name,
                kind,
                "https to http" if downgrade and parts.hostname else "not http(s)",
            )
            self._invalid("redirect", "upstream redirected to a URL not followed")
        return target

    async def head_manifest(self, repository: str, reference: str) -> ManifestInfo:
        """Raises ManifestUnknown, UpstreamError."""
        async with self._request(
            "HEAD",
            repository,
            f"manifests/{reference}",
            "manifest_head",
            headers={"Accept": MANIFEST_ACCEPT},
        ) as resp:
            _check(resp, lambda: ManifestUnknown(repository, reference))
            return ManifestInfo(
                resp.headers.get("Docker-Content-Digest"),
                self._media_type(resp, "manifest_head"),
                resp.content_length or 0,
            )

    async def get_manifest(
        self, repository: str, reference: str
    ) -> tuple[ManifestInfo, bytes]:
        """The manifest bytes exactly as upstream sent them.

        A body cut short (the connection broke or stalled mid-manifest) is
        asked for again, up to `retries` attempts in all: each attempt spends
        a Docker Hub pull, but a 503 would send Docker to Docker Hub itself,
        which spends one too, outside the mirror.

        Raises ManifestUnknown, ManifestTooLarge, UpstreamError (including
        an invalid Content-Type).
        """
        attempts = max(1, self._config.retries)
        for attempt in range(1, attempts + 1):
            try:
                return await self._get_manifest_once(repository, reference)
            except BodyCut as exc:
                if attempt == attempts:
                    raise
                self._metrics.retries.labels("manifest").inc()
                log.info(
                    "upstream cut manifest %s:%s short (%s); attempt %d of %d",
                    repository,
                    reference,
                    exc.detail,
                    attempt,
                    attempts,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_manifest_once(
        self, repository: str, reference: str
    ) -> tuple[ManifestInfo, bytes]:
        async with self._request(
            "GET",
            repository,
            f"manifests/{reference}",
            "manifest",
            headers={"Accept": MANIFEST_ACCEPT},
            counted=True,
        ) as resp:
            _check(resp, lambda: ManifestUnknown(repository, reference))
            kind = self._media_type(resp, "manifest")
            body = await self._read_body(resp, "manifest")
            if not _json_object(body):
                # A proxy's error page with 200, say: not a manifest.
                self._invalid("manifest", "upstream sent a manifest that is not JSON")
            self._metrics.bytes.labels("manifest").inc(len(body))
            info = ManifestInfo(
                resp.headers.get("Docker-Content-Digest"), kind, len(body)
            )
            return info, body

    @contextlib.asynccontextmanager
    async def blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AsyncIterator[BlobResponse]:
        """An open blob body, from `offset` on if upstream honours the Range.

        A 206 must start exactly at `offset`; a 200 (Range ignored) starts at
        0 and the caller skips what it has. Reading the body may raise
        UpstreamUnavailable. Raises BlobUnknown, UpstreamError before yielding.
        """
        headers = {"Range": f"bytes={offset}-"} if offset else None
        async with self._request(
            "GET", repository, f"blobs/{digest}", "blob", headers=headers, blob=True
        ) as resp:
            _check(resp, lambda: BlobUnknown(digest))
            if resp.status == 206 and offset:
                start, size = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    raise UpstreamUnavailable(
                        "upstream answered another range",
                        {"asked": offset, "got": resp.headers.get("Content-Range")},
                    )
                yield BlobResponse(resp, start, size)
            elif resp.status == 200:
                yield BlobResponse(resp, 0, resp.content_length)
            else:
                raise UpstreamUnavailable(
                    "unexpected upstream status for blob", {"status": resp.status}
                )

    async def head_blob(self, repository: str, digest: str) -> int | None:
        """The blob's size (None if upstream does not say).

        Raises BlobUnknown, UpstreamError.
        """
        async with self._request(
            "HEAD", repository, f"blobs/{digest}", "blob_head", blob=True
        ) as resp:
            _check(resp, lambda: BlobUnknown(digest))
            return resp.content_length

    async def list_tags(self, repository: str, params: dict[str, str]) -> Passthrough:
        """tags/list relayed as is, pagination parameters included.

        Raises NameUnknown, UpstreamError.
        """
        async with self._request(
            "GET", repository, "tags/list", "tags", params=params
        ) as resp:
            _check(resp, lambda: NameUnknown("repository name not known to registry"))
            kind = self._media_type(resp, "tags")
            body = await self._read_body(resp, "tags")
            link = resp.headers.get("Link")
            if link is not None and not _printable(link):
                link = None
            return Passthrough(resp.status, kind, body, link)

    async def get_referrers(
        self, repository: str, digest: str, params: dict[str, str]
    ) -> Passthrough | None:
        """The referrers of `digest` (OCI 1.1), relayed as upstream sent them;
        None when upstream answers 404: it has no referrers API (or no such
        repository), and clients are to fall back to the tag schema.

        Raises UpstreamError (including a body that is not a JSON object).
        """
        async with self._request(
            "GET",
            repository,
            f"referrers/{digest}",
            "referrers",
            headers={"Accept": OCI_INDEX},
            params=params,
        ) as resp:
            if resp.status == 404:
                return None
            _check(resp, lambda: NameUnknown("repository name not known to registry"))
            kind = self._media_type(resp, "referrers")
            body = await self._read_body(resp, "referrers")
            if not _json_object(body):
                self._invalid(
                    "manifest", "upstream sent a referrers list that is not JSON"
                )
            filters = resp.headers.get("OCI-Filters-Applied")
            link = resp.headers.get("Link")
            return Passthrough(
                resp.status,
                kind,
                body,
                link if link is not None and _printable(link) else None,
                filters if filters is not None and _printable(filters) else None,
            )

    # --- checks on what upstream sends ---------------------------------------

    def _invalid(self, reason: str, message: str, detail: object = None) -> NoReturn:
        """Count and raise a response refused for `reason`.

        Raises UpstreamUnavailable, or ManifestTooLarge for reason too_large.
        """
        self._metrics.invalid.labels(reason).inc()
        if reason == "too_large":
            raise ManifestTooLarge(message, detail)
        raise UpstreamUnavailable(message, detail)

    def _check_encoding(self, resp: aiohttp.ClientResponse, kind: str) -> None:
        """Refuse an encoded body: we asked for identity, and a gzip manifest
        would be hashed, cached and served as if it were JSON."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            log.warning(
                "upstream sent a %s response with Content-Encoding %r; refused",
                kind,
                encoding[:32],
            )
            self._invalid(
                "encoding", "upstream sent an encoded body we did not ask for"
            )

    def _media_type(self, resp: aiohttp.ClientResponse, kind: str) -> str:
        """The response's media type, parameters dropped (clients compare the
        type as sent). Raises UpstreamUnavailable when it is not valid."""
        try:
            # A tag list without a type is still JSON; a manifest is not.
            fallback = "application/json" if kind == "tags" else None
            value = media_type(resp.headers.get("Content-Type") or fallback)
            if not _json_type(value):
                raise ValueError(f"{value} is not a JSON type")
            return value
        except ValueError as exc:
            log.warning("upstream sent a %s response with a bad type: %s", kind, exc)
            self._invalid("media_type", "upstream sent an invalid Content-Type")

    async def _read_body(self, resp: aiohttp.ClientResponse, kind: str) -> bytes:
        """The whole body, read to EOF in as many reads as it takes, but never
        more than max_body_size. Raises ManifestTooLarge past the limit."""
        limit = self._config.max_body_size
        body = await read_bounded(resp, limit)
        if body is None:
            self._invalid("too_large", f"upstream {kind} body exceeds {limit} bytes")
        return body


class BodyCut(UpstreamUnavailable):
    """A response body broke off (reset, stalled past read_timeout)."""


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: what a credential or challenge is for."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}".lower()


def describe_error(exc: BaseException) -> str:
    """A one-line description of a network error, safe for logs and clients:
    URL queries (CDN signatures) and userinfo are cut out."""
    text = str(exc) or type(exc).__name__
    return _URL_SECRETS.sub(lambda m: m.group(1) or "?…", text)[:300]


def _json_type(value: str) -> bool:
    """Manifests and tag lists are JSON: application/json, or a +json type
    (OCI and Docker manifests), or Docker's signed schema 1 manifest."""
    return (
        value == "application/json"
        or value.endswith("+json")
        or value == "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )


def _json_object(body: bytes) -> bool:
    """Does the body look like a JSON object? Only its first byte is looked
    at: enough to refuse an HTML or text page, cheap for a 4 MiB index, and
    it does not refuse JSON nested deeper than Python parses (the client,
    which checks the digest anyway, decides about the rest)."""
    return body.lstrip(b" \t\r\n")[:1] == b"{"


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _check(resp: aiohttp.ClientResponse, not_found: Callable[[], MirrorError]) -> None:
    """Raise the domain error for a non-2xx upstream status."""
    status = resp.status
    if status < 300:
        return
    if status == 404:
        raise not_found()
    if 300 <= status < 400:
        raise UpstreamUnavailable(
            "upstream answered with a redirect that names no Location",
            {"status": status},
        )
    if status in (401, 403):
        raise UpstreamDenied(
            "upstream denied access: the repository does not exist or needs "
            "credentials",
            {"status": status},
        )
    raise UpstreamUnavailable("upstream failed", {"status": status})


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); unknown parts are None."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = match.group(2)
    return int(match.group(1)), None if total == "*" else int(total)
