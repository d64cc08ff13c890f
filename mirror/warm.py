"""`mirror warm`: pre-pull images into a running mirror over HTTP.

For each image it does what a client's pull does, through the mirror's own
`/v2/` API, so the daemon fetches and caches everything once: the manifest
(with the full Accept list, so an index comes back as an index), every child
manifest of an index (or only the `--platform` one), then the config and
layer blobs, whose bytes are read and thrown away. Blob GETs run a few at a
time (`concurrency`); a blob already warmed in this run is not asked for
again. Attestation manifests in an index (platform `unknown/unknown`) are
skipped, as clients skip them, and so are foreign layers, which live outside
the registry.

An image of a registry other than docker.io (`ghcr.io/owner/app:1`) is
asked for with `?ns=<host>` on every request, as containerd's mirror
configuration does; that is how the mirror routes it. A registry the mirror
is not configured for answers `404 NAME_UNKNOWN`, which is reported as is.
docker.io images go without `ns`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mirror.config import DOCKER_IO, Address
from mirror.errors import MirrorError
from mirror.logutil import human_size
from mirror.ops import (
    ImageRef,
    OpsError,
    UsageError,
    parse_image_ref,
    qualified_name,
    short_digest,
)
from mirror.reference import parse_digest
from mirror.upstream.client import MANIFEST_ACCEPT
from mirror.values import loads_json

INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
# Indexes inside indexes are legal and rare; more depth than this is a loop.
MAX_DEPTH = 4
READ_CHUNK = 1024 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)


class WarmError(OpsError):
    """One image could not be warmed; the message says what failed."""


# on_bytes(result, total): `result.bytes` of the image's blobs are read, of
# `total` (what its manifests declare for the blobs this run fetches; None
# when one declares no size). Called once before the first byte too.
BytesCallback = Callable[["WarmResult", int | None], None]


@dataclass(frozen=True, slots=True)
class Platform:
    """`os/architecture[/variant]`, as in `docker pull --platform`."""

    os: str
    architecture: str
    variant: str | None = None

    def matches(self, platform: object) -> bool:
        if not isinstance(platform, dict):
            return False
        return (
            platform.get("os") == self.os
            and platform.get("architecture") == self.architecture
            and (self.variant is None or platform.get("variant") == self.variant)
        )

    def __str__(self) -> str:
        parts = [self.os, self.architecture]
        return "/".join(parts if self.variant is None else [*parts, self.variant])


def parse_platform(text: str) -> Platform:
    """Raises UsageError."""
    parts = text.strip().split("/")
    if len(parts) in (2, 3) and all(parts):
        return Platform(*parts)
    raise UsageError(f"{text!r} is not a platform (use e.g. linux/amd64, linux/arm/v7)")


def read_image_list(path: Path) -> list[str]:
    """Images from a file: one per line; `#` starts a comment. Raises UsageError."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    images = []
    for line in text.splitlines():
        image = line.partition("#")[0].strip()
        if image:
            images.append(image)
    return images


def default_mirror_url(listen: Address) -> str:
    """The URL of a mirror listening on `listen`, seen from this host."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        listen.host, listen.host
    )
    return f"http://{Address(host, listen.port)}"


@dataclass
class WarmResult:
    image: str  # as given
    registry: str  # "docker.io", "ghcr.io", ...; "" when `image` did not parse
    repository: str
    reference: str  # the tag or digest asked for
    digest: str | None = None  # of the top manifest, from the mirror
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0  # blob bytes read
    seconds: float = 0.0
    error: str | None = None

    @property
    def name(self) -> str:
        """`library/alpine:3`, `library/alpine@sha256:…`, `ghcr.io/owner/app:1`."""
        return _image_name(self.registry, self.repository, self.reference)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Plan:
    manifests: int = 0
    # digest -> expected size, config and layers of every manifest taken
    blobs: dict[str, int] = field(default_factory=dict)


class Warmer:
    """Warms images through one mirror with one ClientSession (the caller's)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        mirror_url: str,
        *,
        platform: Platform | None = None,
        concurrency: int = 3,
        on_bytes: BytesCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.base = mirror_url.rstrip("/")
        self.platform = platform
        self.on_bytes = on_bytes
        self.clock = clock
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._warmed: set[str] = set()

    async def warm(self, text: str) -> WarmResult:
        """Warm one image given as text; failures are in the result."""
        started = self.clock()
        try:
            ref = parse_image_ref(text, default_tag="latest")
        except UsageError as exc:
            return WarmResult(text, "", "", "", error=str(exc))
        result = WarmResult(text, ref.registry, ref.repository, ref.reference)
        try:
            await self._warm(ref, result)
        except WarmError as exc:
            result.error = str(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        result.seconds = self.clock() - started
        return result

    async def _warm(self, ref: ImageRef, result: WarmResult) -> None:
        plan = _Plan()
        result.digest = await self._manifest(ref, ref.reference, plan, 0)
        result.manifests = plan.manifests
        result.blobs = len(plan.blobs)
        todo = [(d, n) for d, n in plan.blobs.items() if d not in self._warmed]
        total = None if any(n < 0 for _, n in todo) else sum(n for _, n in todo)
        if todo and self.on_bytes is not None:
            self.on_bytes(result, total)
        outcomes = await asyncio.gather(
            *(self._blob(ref, d, n, result, total) for d, n in todo),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, Exception
            ):
                raise outcome  # cancellation and the like
        errors = [o for o in outcomes if isinstance(o, Exception)]
        if errors:
            first = errors[0]
            if isinstance(first, WarmError):
                raise first
            raise WarmError(f"{type(first).__name__}: {first}".rstrip(": "))

    async def _manifest(
        self, ref: ImageRef, reference: str, plan: _Plan, depth: int
    ) -> str | None:
        """GET a manifest of `ref`'s repository, add what it needs to `plan`;
        its digest."""
        name = _image_name(ref.registry, ref.repository, reference)
        url = f"{self.base}/v2/{ref.repository}/manifests/{reference}"
        async with self.session.get(
            url, headers={"Accept": MANIFEST_ACCEPT}, params=_namespace(ref)
        ) as resp:
            if resp.status != 200:
                raise WarmError(f"manifest {name}: {await _describe(resp)}")
            body = await resp.read()
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = resp.headers.get("Docker-Content-Digest")
        plan.manifests += 1
        try:
            doc = loads_json(body)
        except ValueError:
            raise WarmError(f"manifest {name} is not JSON") from None
        if not isinstance(doc, dict):
            raise WarmError(f"manifest {name} is not an object")
        media_type = media_type or str(doc.get("mediaType", ""))
        if media_type in INDEX_MEDIA_TYPES or "manifests" in doc:
            children = [c for c in _descriptors(doc.get("manifests")) if _wanted(c)]
            if self.platform is not None:
                children = [
                    c for c in children if self.platform.matches(c.get("platform"))
                ]
                if not children:
                    raise WarmError(f"{name} has no manifest for {self.platform}")
            if depth >= MAX_DEPTH:
                raise WarmError(f"{name}: indexes nested too deep")
            for child in children:
                await self._manifest(ref, child["digest"], plan, depth + 1)
            return digest
        for blob in [
            *_descriptors([doc.get("config")]),
            *_descriptors(doc.get("layers")),
        ]:
            media = str(blob.get("mediaType", ""))
            if "foreign" in media or "nondistributable" in media or blob.get("urls"):
                continue  # served from elsewhere (e.g. Windows base layers)
            size = blob.get("size")
            plan.blobs[blob["digest"]] = size if isinstance(size, int) else -1
        return digest

    async def _blob(
        self,
        ref: ImageRef,
        digest: str,
        size: int,
        result: WarmResult,
        total: int | None,
    ) -> None:
        async with self._slots:
            if digest in self._warmed:
                return
            url = f"{self.base}/v2/{ref.repository}/blobs/{digest}"
            got = 0
            async with self.session.get(url, params=_namespace(ref)) as resp:
                if resp.status != 200:
                    raise WarmError(f"blob {digest}: {await _describe(resp)}")
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    got += len(chunk)
                    result.bytes += len(chunk)
                    if self.on_bytes is not None:
                        self.on_bytes(result, total)
            if size >= 0 and got != size:
                raise WarmError(f"blob {digest}: got {got} bytes, expected {size}")
            self._warmed.add(digest)


def _namespace(ref: ImageRef) -> dict[str, str]:
    """The query that routes a request to `ref`'s registry: none for docker.io."""
    return {} if ref.registry == DOCKER_IO else {"ns": ref.registry}


def _image_name(registry: str, repository: str, reference: str) -> str:
    sep = "@" if ":" in reference else ":"
    return f"{qualified_name(registry, repository)}{sep}{reference}"


def _descriptors(items: object) -> list[dict[str, Any]]:
    """The descriptors in a manifest's list; raises WarmError for a bad digest
    (it goes into a URL)."""
    if not isinstance(items, list):
        return []
    found = [i for i in items if isinstance(i, dict) and "digest" in i]
    for item in found:
        try:
            parse_digest(str(item["digest"]))
        except MirrorError:
            raise WarmError(
                f"invalid digest {item['digest']!r} in a manifest"
            ) from None
    return found


def _wanted(child: dict[str, Any]) -> bool:
    """Not an attestation (BuildKit puts them in indexes as unknown/unknown)."""
    platform = child.get("platform")
    annotations = child.get("annotations")
    if isinstance(annotations, dict) and "vnd.docker.reference.type" in annotations:
        return False
    return not (
        isinstance(platform, dict)
        and platform.get("os") == "unknown"
        and platform.get("architecture") == "unknown"
    )


async def _describe(resp: aiohttp.ClientResponse) -> str:
    """`404 MANIFEST_UNKNOWN: manifest unknown` from an OCI error body."""
    text = f"{resp.status} {resp.reason or ''}".strip()
    try:
        error = (await resp.json(content_type=None))["errors"][0]
        return f"{resp.status} {error['code']}: {error.get('message', '')}".rstrip(": ")
    except (ValueError, KeyError, IndexError, TypeError, aiohttp.ClientError):
        return text


async def warm(
    mirror_url: str,
    images: Iterable[str],
    *,
    platform: Platform | None = None,
    concurrency: int = 3,
    on_result: Callable[[WarmResult], None] | None = None,
    on_bytes: BytesCallback | None = None,
) -> list[WarmResult]:
    """Warm `images` one after the other; returns one result per image."""
    results = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        warmer = Warmer(
            session,
            mirror_url,
            platform=platform,
            concurrency=concurrency,
            on_bytes=on_bytes,
        )
        for image in images:
            result = await warmer.warm(image)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def render_result(result: WarmResult) -> str:
    if result.error is not None:
        return f"FAILED  {result.image}: {result.error}"
    digest = short_digest(result.digest) if result.digest else "-"
    return (
        f"ok      {result.name} {digest}: "
        f"{_plural(result.manifests, 'manifest')}, {_plural(result.blobs, 'blob')}, "
        f"{human_size(result.bytes)} in {result.seconds:.1f}s"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_summary(results: list[WarmResult], seconds: float) -> str:
    failed = sum(1 for r in results if not r.ok)
    total = sum(r.bytes for r in results)
    line = (
        f"warmed {len(results) - failed} of {len(results)} images: "
        f"{human_size(total)} in {seconds:.1f}s"
    )
    return line + (f"; {failed} failed" if failed else "")
