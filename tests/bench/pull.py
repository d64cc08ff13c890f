"""A pulling client that makes the requests dockerd makes, and times them.

This module owns ``pull``: one image pull as dockerd 20.10 does it against a
registry mirror, request for request:

1. ``GET /v2/`` (the ping that checks the API version and auth);
2. ``HEAD /v2/<name>/manifests/<tag>`` to resolve the tag to a digest;
3. ``GET /v2/<name>/manifests/<digest>``;
4. the config blob, concurrently with the layers, which are fetched at most
   three at a time (dockerd's ``max-concurrent-downloads`` default).

Every manifest and blob is hashed as it arrives and checked against its
digest and size, as dockerd does, so a cache serving wrong bytes fails the
benchmark instead of winning it. ``herd`` starts many such pulls at once.

With credentials (``authorization``, a Basic ``Authorization`` value) the
ping goes without them and must be answered ``401`` with a Basic challenge,
and every later request carries them: what dockerd does with a registry
that asks for a login.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.integration.images import MEDIA_TYPES

# The Accept list dockerd sends: both manifest kinds in both flavours. Sent
# verbatim by every client here (and by wrk), so nginx's Accept-keyed cache
# entries made by pulls are the ones the load generator hits.
ACCEPT = ", ".join(
    MEDIA_TYPES[flavour][kind]
    for flavour in ("docker", "oci")
    for kind in ("manifest", "index")
)
MANIFEST_HEADERS = {"Accept": ACCEPT}
LAYER_CONCURRENCY = 3
CHUNK = 256 * 1024


class PullError(Exception):
    """A response was not what a registry must answer (status, digest, size)."""


@dataclass(frozen=True)
class PullResult:
    seconds: float
    blobs: int
    blob_bytes: int


def new_session(connections: int = 8) -> aiohttp.ClientSession:
    """One client's HTTP session: a few keep-alive connections, no proxies.

    ``auto_decompress=False``: blobs are opaque bytes, hashed as served.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=600, sock_read=120),
        auto_decompress=False,
        trust_env=False,
    )


def _check(response: aiohttp.ClientResponse, what: str) -> None:
    if response.status != 200:
        raise PullError(f"{what}: HTTP {response.status}")


def check_challenge(response: aiohttp.ClientResponse, what: str) -> None:
    """Raise PullError unless ``response`` is a 401 asking for Basic auth."""
    challenge = response.headers.get("WWW-Authenticate", "")
    if response.status != 401 or not challenge.lower().startswith("basic "):
        raise PullError(
            f"{what} without credentials: HTTP {response.status}, "
            f"WWW-Authenticate {challenge!r}; expected a 401 Basic challenge"
        )


async def resolve_tag(
    session: aiohttp.ClientSession,
    base: str,
    repository: str,
    tag: str,
    headers: Mapping[str, str] | None = None,
) -> str:
    """HEAD the tag and return the ``Docker-Content-Digest`` it answers."""
    url = f"{base}/v2/{repository}/manifests/{tag}"
    sent = {**MANIFEST_HEADERS, **(headers or {})}
    async with session.head(url, headers=sent) as response:
        _check(response, f"HEAD {url}")
        digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        raise PullError(f"HEAD {url}: no Docker-Content-Digest")
    return digest


async def fetch_manifest(
    session: aiohttp.ClientSession,
    base: str,
    repository: str,
    digest: str,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """GET a manifest by digest, verify it, and return it parsed."""
    url = f"{base}/v2/{repository}/manifests/{digest}"
    sent = {**MANIFEST_HEADERS, **(headers or {})}
    async with session.get(url, headers=sent) as response:
        _check(response, f"GET {url}")
        body = await response.read()
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise PullError(f"GET {url}: body does not match its digest")
    manifest: dict[str, Any] = json.loads(body)
    if "layers" not in manifest:
        raise PullError(f"GET {url}: not an image manifest (an index?)")
    return manifest


async def fetch_blob(
    session: aiohttp.ClientSession,
    base: str,
    repository: str,
    digest: str,
    size: int,
    headers: Mapping[str, str] | None = None,
) -> int:
    """GET a blob, hashing it as it streams; return its size once verified."""
    url = f"{base}/v2/{repository}/blobs/{digest}"
    hasher = hashlib.sha256()
    received = 0
    async with session.get(url, headers=headers) as response:
        _check(response, f"GET {url}")
        async for chunk in response.content.iter_chunked(CHUNK):
            hasher.update(chunk)
            received += len(chunk)
    if received != size:
        raise PullError(f"GET {url}: {received} bytes, manifest says {size}")
    if "sha256:" + hasher.hexdigest() != digest:
        raise PullError(f"GET {url}: content does not match its digest")
    return received


async def pull(
    session: aiohttp.ClientSession,
    base: str,
    repository: str,
    tag: str,
    *,
    authorization: str | None = None,
) -> PullResult:
    """Pull ``repository:tag`` from ``base`` the way dockerd does; time it.

    With ``authorization`` the ping must be a 401 Basic challenge and the
    rest of the requests send it. Raises PullError for any other answer.
    """
    started = time.perf_counter()
    headers = {} if authorization is None else {"Authorization": authorization}
    async with session.get(f"{base}/v2/") as response:
        if authorization is None:
            _check(response, "GET /v2/")
        else:
            check_challenge(response, "GET /v2/")
    digest = await resolve_tag(session, base, repository, tag, headers)
    manifest = await fetch_manifest(session, base, repository, digest, headers)
    slots = asyncio.Semaphore(LAYER_CONCURRENCY)

    async def layer(descriptor: dict[str, Any]) -> int:
        async with slots:
            return await fetch_blob(
                session,
                base,
                repository,
                descriptor["digest"],
                descriptor["size"],
                headers,
            )

    config = manifest["config"]
    sizes = await asyncio.gather(
        fetch_blob(
            session, base, repository, config["digest"], config["size"], headers
        ),
        *(layer(descriptor) for descriptor in manifest["layers"]),
    )
    return PullResult(
        seconds=time.perf_counter() - started,
        blobs=len(sizes),
        blob_bytes=sum(sizes),
    )


async def pull_once(
    base: str, repository: str, tag: str, *, authorization: str | None = None
) -> PullResult:
    """One pull in a fresh session: a client with no open connections."""
    async with new_session() as session:
        return await pull(session, base, repository, tag, authorization=authorization)


@dataclass(frozen=True)
class HerdResult:
    seconds: float
    client_seconds: tuple[float, ...]


async def herd(base: str, repository: str, tag: str, clients: int) -> HerdResult:
    """``clients`` independent pulls of one image, all started together.

    Each client has its own session, like separate dockerds. The total is
    from the start to the last client done.
    """
    sessions = [new_session() for _ in range(clients)]
    try:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(pull(session, base, repository, tag) for session in sessions)
        )
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    return HerdResult(
        seconds=seconds,
        client_seconds=tuple(result.seconds for result in results),
    )
