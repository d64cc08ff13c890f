"""A Docker Hub look-alike edge, built from real parts, with switchable faults.

This module owns ``HubEdge``: two aiohttp listeners on 127.0.0.1, run in the
test's event loop, in front of the real token-auth registry
(``token_upstream``):

* **the registry endpoint**, standing in for registry-1.docker.io. It relays
  ``/v2/`` requests to the registry with their ``Authorization`` header, so
  the 401 challenges (whose realm is the suite's token service) and the token
  checks are the registry's own. Manifest responses get Docker Hub's
  rate-limit headers (``ratelimit-limit: N;w=21600``,
  ``ratelimit-remaining: M;w=21600``, ``docker-ratelimit-source``). Each
  manifest GET the registry answers 200 spends one pull; HEADs spend none;
  with none left a manifest GET gets 429 ``TOOMANYREQUESTS`` with
  ``Retry-After``. A blob GET the registry would serve is answered ``307`` to
  a signed URL on the CDN, as Docker Hub does.
* **the CDN**, standing in for Docker Hub's blob storage behind Cloudflare. It
  serves blob bytes from the registry's storage directory, answers
  ``Range: bytes=N-`` with 206 and ``Content-Range``, and refuses with 403 any
  request carrying an ``Authorization`` header: a client that forwards its
  registry credentials to another host fails its pull here.

Both listeners speak HTTPS when given a server ``tls`` context, as Docker Hub
does. Something may sit in front of each (a ``LatencyProxy``, to put a WAN
between the mirror and the edge): ``front_port`` and ``front_cdn_port`` name
the ports clients reach them at, and ``url`` and the CDN redirects use those.

Faults are switched on with ``inject`` and off with ``clear``: an error status,
a stalled response (held until ``clear`` or a time limit), a blob body cut
mid-stream (part sent, then the transport aborted) or with one byte flipped,
each for a number of requests or until cleared. ``go_down``/``come_up`` close
and reopen the registry endpoint's port, so connections are refused meanwhile.
Every request either listener answers is logged as an ``EdgeRequest`` once
its answer is complete (a stalled one only after it is released).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .upstream import DIGEST_IN_PATH, Request, Upstream

WINDOW = 21600  # Docker Hub's rate-limit window: six hours, in seconds.
SOURCE = "127.0.0.1"  # who Docker Hub says it counts (an IP or an account id)
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# Headers that describe one connection, never relayed across a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
CDN_PREFIX = "/registry-v2/docker/registry/v2/blobs/sha256"
CDN_PATH = re.compile(
    "^" + re.escape(CDN_PREFIX) + r"/[0-9a-f]{2}/(?P<hex>[0-9a-f]{64})/data$"
)
BODY_CHUNK = 64 * 1024

Listener = Literal["registry", "cdn"]
Place = Literal["manifest", "blob", "cdn"]
"""Where a fault applies: the registry endpoint's manifest or blob routes, or
the CDN (where blob bodies flow)."""
Action = Literal["error", "stall", "cut", "corrupt"]


@dataclass
class Fault:
    """One switchable misbehaviour; see ``HubEdge.inject``."""

    action: Action
    place: Place
    times: int | None = None
    """How many matching requests it applies to; None: until cleared."""
    status: int = 503
    """``error``: the status answered."""
    after: int = 64 * 1024
    """``cut``: body bytes sent before the transport is aborted."""
    hold: float = 60.0
    """``stall``: longest hold before the response goes out after all."""
    digest: str | None = None
    """Only requests for this blob or manifest digest (or tag)."""
    method: str | None = None
    """Only requests with this method."""
    applied: int = 0

    def __post_init__(self) -> None:
        if self.action in ("cut", "corrupt") and self.place != "cdn":
            raise ValueError("cut and corrupt apply to blob bodies: place='cdn'")

    def matches(self, place: Place, method: str, reference: str | None) -> bool:
        return (
            self.place == place
            and (self.times is None or self.applied < self.times)
            and (self.method is None or self.method == method)
            and (self.digest is None or self.digest == reference)
        )


@dataclass(frozen=True)
class EdgeRequest(Request):
    """One request a listener answered (``uri``: path and query)."""

    listener: Listener = "registry"
    authorization: bool = False
    """Whether the request carried an Authorization header."""
    host: str = ""
    """Its Host header: which listener the client thought it was talking to."""
    range: str | None = None
    digest: str | None = None
    """The blob a CDN request was for."""
    note: str = ""
    """``pull`` (spent one), ``throttled`` (429), ``refused`` (the CDN said
    403), or the fault applied (``error``, ``stall``, ``cut``, ``corrupt``)."""

    @property
    def range_start(self) -> int | None:
        """N of a ``Range: bytes=N-…`` header; None without one."""
        match = re.fullmatch(r"bytes=(\d+)-\d*", self.range or "")
        return None if match is None else int(match.group(1))

    def __str__(self) -> str:
        extras = [
            "auth" if self.authorization else "",
            f"range={self.range}" if self.range else "",
            self.note,
        ]
        tail = " ".join(e for e in extras if e)
        return f"[{self.listener}] {self.method} {self.uri} -> {self.status} {tail}"


@dataclass(frozen=True)
class EdgeLog:
    """Requests the edge answered between two marks."""

    requests: tuple[EdgeRequest, ...]

    @property
    def registry(self) -> list[EdgeRequest]:
        return [r for r in self.requests if r.listener == "registry"]

    @property
    def cdn(self) -> list[EdgeRequest]:
        return [r for r in self.requests if r.listener == "cdn"]

    @property
    def pulls(self) -> list[EdgeRequest]:
        """Manifest GETs that spent one unit of the rate limit."""
        return [r for r in self.requests if r.note == "pull"]

    def manifests(self, method: str | None = None) -> list[EdgeRequest]:
        return [
            r
            for r in self.registry
            if r.kind == "manifest" and method in (None, r.method)
        ]

    def describe(self) -> str:
        if not self.requests:
            return "(no requests)"
        return "\n".join(f"  {request}" for request in self.requests)


@dataclass(frozen=True)
class _Relayed:
    """A registry response, read in full."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class HubEdge:
    """The registry endpoint and the CDN; ``start()`` in a running loop."""

    registry: Upstream
    limit: int = 100
    """Pulls per window, as sent in ``ratelimit-limit``."""
    remaining: int = 100
    """Pulls left; set it to 0 to make manifest GETs answer 429."""
    retry_after: int = 60
    """Seconds sent in ``Retry-After`` with a 429."""
    requests: list[EdgeRequest] = field(default_factory=list)
    last_ratelimit: tuple[int, int] | None = None
    """(limit, remaining) in the last rate-limit headers sent."""
    port: int = 0
    cdn_port: int = 0
    tls: ssl.SSLContext | None = None
    """Serve both listeners over TLS with this server context."""
    front_port: int | None = None
    """The port clients reach the registry endpoint at, if not ``port``."""
    front_cdn_port: int | None = None
    """The port clients reach the CDN at (redirects point there)."""
    _faults: list[Fault] = field(default_factory=list)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _session: aiohttp.ClientSession | None = None
    _registry_runner: web.ServerRunner | None = None
    _cdn_runner: web.ServerRunner | None = None

    # --- addresses ------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def url(self) -> str:
        """What the mirror's ``upstream.url`` should be."""
        return f"{self.scheme}://127.0.0.1:{self.front_port or self.port}"

    @property
    def cdn_host(self) -> str:
        """Where blob redirects send clients (host:port)."""
        return f"127.0.0.1:{self.front_cdn_port or self.cdn_port}"

    @property
    def cdn_url(self) -> str:
        return f"{self.scheme}://{self.cdn_host}"

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the relay session and both listeners on free ports."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=60),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self._cdn_runner = await _serve(self._cdn, 0, self.tls)
        self.cdn_port = _port(self._cdn_runner)
        self._registry_runner = await _serve(self._registry, 0, self.tls)
        self.port = _port(self._registry_runner)

    async def stop(self) -> None:
        """Release stalled responses, close both listeners and the session."""
        self.clear()
        await self.go_down()
        if self._cdn_runner is not None:
            await self._cdn_runner.cleanup()
            self._cdn_runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def go_down(self) -> None:
        """Close the registry endpoint: its port refuses connections.

        Open keep-alive connections are closed too, so a client cannot slip
        through on one.
        """
        if self._registry_runner is not None:
            await self._registry_runner.cleanup()
            self._registry_runner = None

    async def come_up(self) -> None:
        """Listen again on the registry endpoint's port."""
        if self._registry_runner is None:
            self._registry_runner = await _serve(self._registry, self.port, self.tls)

    # --- faults -----------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Switch a fault on; the first matching fault applies to a request."""
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Switch every fault off and let stalled responses go."""
        self._faults.clear()
        self._released.set()
        self._released = asyncio.Event()

    def _take(self, place: Place, method: str, reference: str | None) -> Fault | None:
        for fault in self._faults:
            if fault.matches(place, method, reference):
                fault.applied += 1
                return fault
        return None

    async def _stall(self, fault: Fault) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), fault.hold)

    # --- the log ----------------------------------------------------------------

    def mark(self) -> int:
        return len(self.requests)

    def log_since(self, mark: int = 0) -> EdgeLog:
        return EdgeLog(tuple(self.requests[mark:]))

    def _record(
        self,
        listener: Listener,
        request: web.BaseRequest,
        status: int,
        note: str = "",
        digest: str | None = None,
    ) -> None:
        self.requests.append(
            EdgeRequest(
                method=request.method,
                uri=request.path_qs,
                status=status,
                user_agent=request.headers.get("User-Agent", ""),
                listener=listener,
                authorization="Authorization" in request.headers,
                host=request.host,
                range=request.headers.get("Range"),
                digest=digest,
                note=note,
            )
        )

    # --- the registry endpoint --------------------------------------------------

    async def _registry(self, request: web.BaseRequest) -> web.StreamResponse:
        match = DIGEST_IN_PATH.match(request.path)
        place: Place | None = None
        reference = None
        if match is not None:
            place = "manifest" if match["kind"] == "manifests" else "blob"
            reference = match["reference"]
        note = ""
        fault = None if place is None else self._take(place, request.method, reference)
        if fault is not None and fault.action == "stall":
            note = "stall"
            await self._stall(fault)
        if fault is not None and fault.action == "error":
            response: web.StreamResponse = _error(
                fault.status, "UNAVAILABLE", "injected fault"
            )
            note = "error"
        elif place == "manifest":
            response, pulled = await self._manifest(request)
            note = note or pulled
        elif place == "blob" and request.method == "GET":
            assert reference is not None
            response = await self._blob_redirect(request, reference)
        else:
            response = _response(await self._relay(request), request.method)
        self._record("registry", request, response.status, note)
        return response

    async def _relay(self, request: web.BaseRequest, method: str = "") -> _Relayed:
        """Send the request on to the registry, headers and all."""
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP
        )
        async with self._session.request(
            method or request.method,
            f"{self.registry.url}{request.path_qs}",
            headers=headers,
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            relayed = CIMultiDict(
                (name, value)
                for name, value in resp.headers.items()
                if name.lower() not in HOP_BY_HOP
            )
            return _Relayed(resp.status, relayed, body)

    async def _manifest(self, request: web.BaseRequest) -> tuple[web.Response, str]:
        """Relay a manifest request, charging GETs to the rate limit."""
        relayed = await self._relay(request)
        note = ""
        if relayed.status == 200 and request.method == "GET":
            if self.remaining <= 0:
                return self._too_many_requests(), "throttled"
            self.remaining -= 1
            note = "pull"
        response = _response(relayed, request.method)
        if relayed.status != 401:
            # Docker Hub counts authenticated requests and reports on them.
            self._ratelimit_headers(response)
        return response, note

    def _ratelimit_headers(self, response: web.StreamResponse) -> None:
        remaining = max(0, self.remaining)
        response.headers["ratelimit-limit"] = f"{self.limit};w={WINDOW}"
        response.headers["ratelimit-remaining"] = f"{remaining};w={WINDOW}"
        response.headers["docker-ratelimit-source"] = SOURCE
        self.last_ratelimit = (self.limit, remaining)

    def _too_many_requests(self) -> web.Response:
        response = _error(
            429,
            "TOOMANYREQUESTS",
            "You have reached your pull rate limit. You may increase the limit "
            "by authenticating and upgrading: https://www.docker.com/increase-rate-limit",
        )
        response.headers["Retry-After"] = str(self.retry_after)
        self._ratelimit_headers(response)
        return response

    async def _blob_redirect(
        self, request: web.BaseRequest, digest: str
    ) -> web.StreamResponse:
        """Check access like Docker Hub, then send the client to the CDN."""
        check = await self._relay(request, "HEAD")
        # 206: the registry honours a client's Range even on a HEAD.
        if check.status not in (200, 206):
            # The registry's own answer (401 challenge, 404, ...) with its body.
            return _response(await self._relay(request), request.method)
        hex_digest = digest.removeprefix("sha256:")
        expires = str(int(time.time()) + 600)
        query = urlencode(
            {"expires": expires, "signature": self._sign(hex_digest, expires)}
        )
        location = (
            f"{self.cdn_url}{CDN_PREFIX}/{hex_digest[:2]}/{hex_digest}/data?{query}"
        )
        return web.Response(status=307, headers={**API_VERSION, "Location": location})

    def _sign(self, hex_digest: str, expires: str) -> str:
        message = f"{hex_digest}:{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    # --- the CDN ----------------------------------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        """Where the registry's filesystem driver keeps a blob's bytes."""
        return (
            self.registry.workdir
            / "storage/docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    async def _cdn(self, request: web.BaseRequest) -> web.StreamResponse:
        match = CDN_PATH.match(request.path)
        digest = None if match is None else "sha256:" + match["hex"]
        response, note = await self._cdn_response(request, match)
        self._record("cdn", request, response.status, note, digest)
        return response

    async def _cdn_response(
        self, request: web.BaseRequest, match: re.Match[str] | None
    ) -> tuple[web.StreamResponse, str]:
        if "Authorization" in request.headers:
            return _text(403, "credentials must not be sent to the CDN"), "refused"
        if match is None:
            return _text(404, "no such object"), ""
        expires = request.query.get("expires", "")
        signature = request.query.get("signature", "")
        valid = hmac.compare_digest(signature, self._sign(match["hex"], expires))
        if not valid or not expires.isdigit() or int(expires) < time.time():
            return _text(403, "bad or expired signature"), "refused"
        path = self.blob_path(match["hex"])
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return _text(404, "no such object"), ""
        start = _range_start(request.headers.get("Range"))
        if start is not None and start >= len(data):
            unsatisfiable = _text(416, "range not satisfiable")
            unsatisfiable.headers["Content-Range"] = f"bytes */{len(data)}"
            return unsatisfiable, ""

        fault = self._take("cdn", request.method, "sha256:" + match["hex"])
        if fault is not None and fault.action == "stall":
            await self._stall(fault)
        if fault is not None and fault.action == "error":
            return _text(fault.status, "injected fault"), "error"
        body = data if start is None else data[start:]
        if fault is not None and fault.action == "corrupt" and body:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0xFF
            body = bytes(flipped)

        response = web.StreamResponse(
            status=200 if start is None else 206,
            headers={
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
            },
        )
        if start is not None:
            response.headers["Content-Range"] = (
                f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
        response.content_length = len(body)
        note = "" if fault is None else fault.action
        try:
            await response.prepare(request)
            if request.method == "HEAD":
                return response, note
            if fault is not None and fault.action == "cut" and fault.after < len(body):
                await _write(response, body[: fault.after])
                await _abort(request)
                return response, note
            await _write(response, body)
            await response.write_eof()
        except ConnectionError:
            return response, (note + " client left").strip()
        return response, note


# --- helpers ----------------------------------------------------------------------


async def _serve(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    port: int,
    tls: ssl.SSLContext | None,
) -> web.ServerRunner:
    """Listen on 127.0.0.1:``port`` (0: any free port) with ``handler``."""
    runner = web.ServerRunner(
        web.Server(handler), handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner


def _port(runner: web.BaseRunner) -> int:
    address = runner.addresses[0]
    port: int = address[1]
    return port


def _response(relayed: _Relayed, method: str) -> web.Response:
    """A web response carrying a relayed registry answer."""
    headers = CIMultiDict(relayed.headers)
    if method != "HEAD":
        # aiohttp sets the length of the body it sends; a HEAD keeps the
        # registry's, which is what tells the client the size.
        headers.popall("Content-Length", None)
    return web.Response(
        status=relayed.status, headers=headers, body=relayed.body or None
    )


def _error(status: int, code: str, message: str) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return web.Response(
        status=status, text=body, content_type="application/json", headers=API_VERSION
    )


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


def _range_start(value: str | None) -> int | None:
    """N of ``bytes=N-`` (the only form a pulling client sends); else None."""
    match = re.fullmatch(r"\s*bytes=(\d+)-\s*", value or "")
    return None if match is None else int(match.group(1))


async def _write(response: web.StreamResponse, body: bytes) -> None:
    for offset in range(0, len(body), BODY_CHUNK):
        await response.write(body[offset : offset + BODY_CHUNK])


async def _abort(request: web.BaseRequest) -> None:
    """Cut the connection once what was written has reached the socket.

    Aborting drops whatever still sits in the transport's buffer, so wait
    (briefly) for it to drain: the client then really got ``after`` bytes.
    """
    transport = request.transport
    if transport is None:
        return
    deadline = time.monotonic() + 5.0
    # asyncio signals "buffer below the low-water mark", never "empty": poll.
    while transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    transport.abort()
