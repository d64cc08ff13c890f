"""UpstreamClient: the registry API calls mirror makes, over one ClientSession.

It speaks Registry HTTP API V2 to one upstream (Docker Hub by default):
manifest HEAD/GET, blob GET (following the 307 to a CDN; aiohttp drops the
Authorization header on a cross-origin redirect) and tags/list. It answers
auth challenges through `TokenAuth`, and turns every failure into the domain
exceptions of `mirror.errors`: nothing from aiohttp escapes except from the
body stream of an open blob response, which the caller reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from mirror.config import UpstreamConfig
from mirror.errors import (
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    UpstreamDenied,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.upstream.auth import Credentials, TokenAuth
from mirror.upstream.ratelimit import RateLimit
from mirror.upstream.retry import RetryPolicy

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
# The distribution registry refuses manifests over 4 MiB; so do we, to bound
# the memory one request can take.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
USER_AGENT = "mirror/0.1 (+pull-through cache)"


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
    """An upstream response relayed as is (tags/list)."""

    status: int
    content_type: str
    body: bytes
    link: str | None


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


class UpstreamClient:
    """Registry calls against `config.url`. `open()` before use, `close()` after.

    Idempotent requests are retried (see retry.py). After a request failed
    every attempt, upstream is considered down for `down_backoff` and requests
    fail at once, so clients get a quick 503 (and the cache serves what it
    has) instead of each waiting out the retries. After a 429, requests that
    would spend a pull (manifest GETs) fail at once with UpstreamRateLimited
    until the throttle passes.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        credentials = (
            Credentials(config.username, config.password) if config.username else None
        )
        self.auth = TokenAuth(
            self._get_session,
            metrics,
            upstream_url=config.url,
            credentials=credentials,
            trusted_realms=config.trusted_realms,
            clock=clock,
        )
        self.ratelimit = RateLimit(
            metrics, warn_below=config.ratelimit_warn_below, clock=clock
        )
        self._retry = RetryPolicy(
            config.retries, config.retry_backoff, config.retry_max_time
        )
        self._down_until = 0.0

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient used before open()")
        return self._session

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._config.connect_timeout,
            sock_read=self._config.read_timeout,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            # Bodies are read by us as streams; never let aiohttp decompress.
            auto_decompress=False,
        )
        self._metrics.upstream_up.set(1)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request, retried and authenticated; yields its response.

        The response yielded has a status below 500 other than 429; errors
        reading its body inside the block become UpstreamUnavailable.
        `counted`: the request spends a Docker Hub pull (a manifest GET).

        Raises UpstreamUnavailable (unreachable, 5xx, or marked down),
        UpstreamRateLimited (429, or throttled), UpstreamDenied.
        """
        down_for = self.down_for
        if down_for:
            raise UpstreamUnavailable(
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
                        method, url, repository, kind, headers, params
                    )
        except UpstreamUnavailable:
            self._down_until = self._clock() + self._config.down_backoff
            self._metrics.upstream_up.set(0)
            log.warning(
                "upstream %s failed after retries; failing fast for %ss",
                self._config.url,
                self._config.down_backoff,
            )
            raise
        self._metrics.upstream_up.set(1)
        try:
            yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                "upstream body cut short", {"error": str(exc) or type(exc).__name__}
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
    ) -> aiohttp.ClientResponse:
        """Send once, answering one auth challenge. See _request for errors."""
        scope = f"repository:{repository}:pull"
        send: CIMultiDict[str] = CIMultiDict(headers or {})
        for attempt in (1, 2):
            auth = self.auth.header_for(scope)
            if auth:
                send["Authorization"] = auth
            try:
                async with asyncio.timeout(self._config.first_byte_timeout):
                    resp = await self._get_session().request(
                        method, url, headers=send, params=params
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._metrics.upstream_requests.labels(kind, "error").inc()
                raise UpstreamUnavailable(
                    "upstream unreachable", {"error": str(exc) or type(exc).__name__}
                ) from exc
            self._metrics.upstream_requests.labels(kind, str(resp.status)).inc()
            self.ratelimit.observe(resp.headers)
            challenge = resp.headers.get("WWW-Authenticate")
            if resp.status == 401 and challenge and attempt == 1:
                resp.release()
                send["Authorization"] = await self.auth.authenticate(challenge, scope)
                continue
            if resp.status == 429:
                resp.release()
                wait = self.ratelimit.throttle(
                    _retry_after(resp.headers.get("Retry-After"))
                )
                raise UpstreamRateLimited("upstream rate limit reached", wait)
            if resp.status >= 500:
                resp.release()
                raise UpstreamUnavailable("upstream failed", {"status": resp.status})
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

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
                _media_type(resp),
                resp.content_length or 0,
            )

    async def get_manifest(
        self, repository: str, reference: str
    ) -> tuple[ManifestInfo, bytes]:
        """The manifest bytes exactly as upstream sent them.

        Raises ManifestUnknown, ManifestTooLarge, UpstreamError.
        """
        async with self._request(
            "GET",
            repository,
            f"manifests/{reference}",
            "manifest",
            headers={"Accept": MANIFEST_ACCEPT},
            counted=True,
        ) as resp:
            _check(resp, lambda: ManifestUnknown(repository, reference))
            if (resp.content_length or 0) > MAX_MANIFEST_SIZE:
                raise ManifestTooLarge("upstream manifest exceeds 4 MiB")
            body = await resp.content.read(MAX_MANIFEST_SIZE + 1)
            if not resp.content.at_eof():
                raise ManifestTooLarge("upstream manifest exceeds 4 MiB")
            self._metrics.upstream_bytes.labels("manifest").inc(len(body))
            info = ManifestInfo(
                resp.headers.get("Docker-Content-Digest"), _media_type(resp), len(body)
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
            "GET", repository, f"blobs/{digest}", "blob", headers=headers
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
            "HEAD", repository, f"blobs/{digest}", "blob_head"
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
            body = await resp.read()
            return Passthrough(
                resp.status,
                resp.headers.get("Content-Type", "application/json"),
                body,
                resp.headers.get("Link"),
            )


def _media_type(resp: aiohttp.ClientResponse) -> str:
    # Keep parameters off but the type exactly as sent: clients compare it.
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def _check(resp: aiohttp.ClientResponse, not_found: Callable[[], MirrorError]) -> None:
    """Raise the domain error for a non-2xx upstream status."""
    status = resp.status
    if status < 300:
        return
    if status == 404:
        raise not_found()
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


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; only the delta-seconds form, finite, >= 0."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
