"""UpstreamClient: the registry API calls mirror makes, over one ClientSession.

It speaks Registry HTTP API V2 to one upstream (Docker Hub by default):
manifest HEAD/GET, blob GET (following the 307 to a CDN; aiohttp drops the
Authorization header on a cross-origin redirect) and tags/list. It answers
auth challenges through `TokenAuth`, and turns every failure into the domain
exceptions of `mirror.errors`: nothing from aiohttp escapes except from the
body stream of an open blob response, which the caller reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
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
from mirror.upstream.auth import TokenAuth

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
class Passthrough:
    """An upstream response relayed as is (tags/list)."""

    status: int
    content_type: str
    body: bytes
    link: str | None


class BlobResponse:
    """An open upstream blob body. `size` is the full blob size if known."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.size = response.content_length
        self.content = response.content


class UpstreamClient:
    """Registry calls against `config.url`. `open()` before use, `close()` after."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self.auth = TokenAuth(self._get_session, metrics)

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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request, answering one auth challenge if needed.

        Yields the final response, whatever its status; raises
        UpstreamUnavailable on connection errors and timeouts.
        """
        url = f"{self._config.url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        send: CIMultiDict[str] = CIMultiDict(headers or {})
        for attempt in (1, 2):
            auth = self.auth.header_for(scope)
            if auth:
                send["Authorization"] = auth
            try:
                async with self._get_session().request(
                    method, url, headers=send, params=params
                ) as resp:
                    self._metrics.upstream_requests.labels(kind, str(resp.status)).inc()
                    challenge = resp.headers.get("WWW-Authenticate")
                    if resp.status == 401 and challenge and attempt == 1:
                        send["Authorization"] = await self.auth.authenticate(
                            challenge, scope
                        )
                        continue
                    yield resp
                    return
            except MirrorError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._metrics.upstream_requests.labels(kind, "error").inc()
                raise UpstreamUnavailable(
                    "upstream unreachable", {"error": str(exc) or type(exc).__name__}
                ) from exc
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
        ) as resp:
            _check(resp, lambda: ManifestUnknown(repository, reference))
            if (resp.content_length or 0) > MAX_MANIFEST_SIZE:
                raise ManifestTooLarge("upstream manifest exceeds 4 MiB")
            try:
                body = await resp.content.read(MAX_MANIFEST_SIZE + 1)
                if not resp.content.at_eof():
                    raise ManifestTooLarge("upstream manifest exceeds 4 MiB")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(
                    "upstream manifest body cut short", {"error": str(exc)}
                ) from exc
            self._metrics.upstream_bytes.labels("manifest").inc(len(body))
            info = ManifestInfo(
                resp.headers.get("Docker-Content-Digest"), _media_type(resp), len(body)
            )
            return info, body

    @contextlib.asynccontextmanager
    async def blob(self, repository: str, digest: str) -> AsyncIterator[BlobResponse]:
        """An open blob body stream; reading it may raise aiohttp errors.

        Raises BlobUnknown, UpstreamError before yielding.
        """
        async with self._request("GET", repository, f"blobs/{digest}", "blob") as resp:
            _check(resp, lambda: BlobUnknown(digest))
            if resp.status != 200:
                raise UpstreamUnavailable(
                    "unexpected upstream status for blob", {"status": resp.status}
                )
            yield BlobResponse(resp)

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
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable("upstream tags body cut short") from exc
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
    if status == 429:
        raise UpstreamRateLimited(
            "upstream rate limit reached", _retry_after(resp.headers.get("Retry-After"))
        )
    raise UpstreamUnavailable("upstream failed", {"status": status})


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; only the delta-seconds form, finite, >= 0."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
