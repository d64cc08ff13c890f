"""The soak's clients: what each kind does, and how its outcomes are counted.

This module owns the client behaviours and ``Tally``, where every request's
outcome is counted by phase (``clean``, ``cut``, ...), kind and outcome.
Every client is one asyncio task looping until the run's end: one request,
a pause, the next. Kinds:

* ``hit``: a blob from a small hot set, warmed before the load (mostly
  cache hits; ``X-Mirror-Cache`` tells);
* ``miss``: a blob picked from the whole set, most of which the small cache
  cannot hold, so most of these are misses (eviction keeps them coming);
* ``herd``: all herd clients GET the same blob, new to the cache, at the
  same moment, every ``HERD_INTERVAL`` seconds;
* ``range``: a random byte range of a random blob, checked byte for byte;
* ``manifest``: GET or HEAD of a manifest by tag or by digest, and the
  image's config blob after a GET;
* ``stall``: GET a large blob on a socket with a tiny receive buffer, read a
  little, then stop reading for twice ``server.send_timeout``; the mirror
  must have dropped the connection by then (``cut``), not sent it all —
  if it had bytes to send all along: a cached blob, or a download during a
  clean phase (a download paused by an upstream fault leaves it nothing
  to send, and no reason to give up: ``drained``);
* ``disconnect``: GET a blob and leave mid-body (or before the headers),
  half of the time with a reset (``SO_LINGER`` 0);
* ``slowheader``: send a request's headers a byte a second, or finish a
  request and then sit idle; the mirror must close the connection within
  ``server.header_timeout`` (plus slack).

Every complete 200 body is hashed and compared with its digest, every 206
with the original bytes: a wrong one is a ``mismatch``, which must never
happen. The aiohttp clients each have their own session (their own
connections, like separate dockerds); the hostile ones use raw sockets so
that "stop reading" and "send slowly" mean exactly that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.bench.pull import MANIFEST_HEADERS

from .content import Blob, Content, Image

# Outcomes. The first group is what a client may see when upstream fails;
# the second is each hostile kind's expected ending; the last must not occur.
OK = "ok"
UNAVAILABLE = "503"
STATUS = "status"  # any other unexpected HTTP status
RESET = "reset"  # connection reset or cut short of its length
TIMEOUT = "timeout"  # the client gave up waiting
ERROR = "error"  # any other exception
CUT = "cut"  # stall: the mirror dropped the stalled client, as it must
LEFT = "left"  # disconnect: the client left as planned
CLOSED = "closed"  # slowheader: the mirror closed the connection in time
MISMATCH = "mismatch"  # a complete body with the wrong bytes
NOT_CUT = "not_cut"  # stall: the mirror kept sending to a stalled client
# stall: all bytes came after the stall, but the mirror may have had nothing
# to send meanwhile (a download paused by an upstream fault): not a failure.
DRAINED = "drained"
NOT_CLOSED = "not_closed"  # slowheader: the mirror kept a slow client too long
FAILURES = (MISMATCH, NOT_CUT, NOT_CLOSED)
EXPECTED = (OK, CUT, LEFT, CLOSED, DRAINED)

KINDS = (
    "hit",
    "miss",
    "herd",
    "range",
    "manifest",
    "stall",
    "disconnect",
    "slowheader",
)
# Share of the clients of each kind.
MIX = {
    "hit": 0.30,
    "miss": 0.20,
    "herd": 0.15,
    "range": 0.10,
    "manifest": 0.10,
    "stall": 0.05,
    "disconnect": 0.05,
    "slowheader": 0.05,
}
HERD_INTERVAL = 4.0
CHUNK = 256 * 1024
MAX_RANGE = 1 << 20
STALL_RCVBUF = 8 * 1024  # the kernel doubles it; autotuning is then off
STALL_MIN_SIZE = 6 << 20  # bigger than every buffer between us and mirror
EXAMPLES = 40


def assign(clients: int) -> list[str]:
    """The kind of each client, in ``MIX`` proportions (at least one each)."""
    counts = {kind: max(1, round(share * clients)) for kind, share in MIX.items()}
    while sum(counts.values()) > clients and counts["hit"] > 1:
        counts["hit"] -= 1
    while sum(counts.values()) < clients:
        counts["hit"] += 1
    return [kind for kind, count in counts.items() for _ in range(count)]


@dataclass
class Tally:
    """Outcome counts and a few examples of what went wrong."""

    counts: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter
    )
    """(phase, kind, outcome) -> requests."""
    cache_headers: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter
    )
    """(kind, X-Mirror-Cache) -> 200 responses."""
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    """kind (and for blobs, "hit", "miss" or "config") -> seconds of each
    ``ok`` request."""
    close_after: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    """slowheader variant -> seconds until the mirror closed."""
    examples: list[str] = field(default_factory=list)
    """The first few failures and unexpected errors, described."""
    received: int = 0
    """Body bytes received by every client."""

    def add(
        self,
        phase: str,
        kind: str,
        outcome: str,
        *,
        seconds: float | None = None,
        detail: str = "",
        latency: str | None = None,
    ) -> None:
        self.counts[phase, kind, outcome] += 1
        if outcome == OK and seconds is not None:
            self.latencies[latency or kind].append(seconds)
        if (outcome in FAILURES or outcome in (STATUS, ERROR)) and len(
            self.examples
        ) < EXAMPLES:
            self.examples.append(f"[{phase}] {kind} {outcome}: {detail}")

    def by_outcome(self) -> collections.Counter[str]:
        totals: collections.Counter[str] = collections.Counter()
        for (_, _, outcome), count in self.counts.items():
            totals[outcome] += count
        return totals

    def total(self, outcome: str, kind: str | None = None) -> int:
        return sum(
            count
            for (_, k, o), count in self.counts.items()
            if o == outcome and (kind is None or k == kind)
        )


class Herd:
    """Starts every herd client on one blob at the same moment.

    Each round takes the next of ``blobs`` (blobs no other kind asks for,
    so every round meets its blob cold, and the upstream GETs of a herd
    blob are the herd's); ``rounds`` records which, when, in which phase
    and how many clients took part. A round starts once every herd client
    is done with the last one (a queued download can take longer than the
    interval), so each round is the whole herd at once.
    """

    def __init__(self) -> None:
        self.blobs: list[Blob] = []
        self.blob: Blob | None = None
        self.rounds: list[dict[str, object]] = []
        self.members = 0
        self.waiting = 0
        self._fired = asyncio.Event()
        self._back = asyncio.Event()

    def all_waiting(self) -> bool:
        return self.members > 0 and self.waiting >= self.members

    async def everyone_back(self, until: float) -> bool:
        """Wait until every herd client waits for a round; False if the run
        ends first."""
        while not self.all_waiting():
            self._back.clear()
            left = until - time.monotonic()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    await self._back.wait()
            except TimeoutError:
                return False
        return True

    def fire(self, phase: str) -> None:
        blob = self.blobs[len(self.rounds) % len(self.blobs)]
        self.blob = blob
        self.rounds.append(
            {
                "at": time.monotonic(),
                "wall": time.time(),
                "digest": blob.digest,
                "phase": phase,
                "clients": self.waiting,
            }
        )
        fired, self._fired = self._fired, asyncio.Event()
        fired.set()

    async def next(self, until: float) -> Blob | None:
        """The next herd blob, or None if the run ends first."""
        fired = self._fired
        left = until - time.monotonic()
        if left <= 0:
            return None
        self.waiting += 1
        if self.all_waiting():
            self._back.set()
        try:
            async with asyncio.timeout(left):
                await fired.wait()
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
        return self.blob


@dataclass
class World:
    """What every client shares: targets, content, the clock, the tally."""

    host: str
    port: int
    content: Content
    send_timeout: float
    header_timeout: float
    tally: Tally
    herd: Herd
    seed: str
    phase: str = "warmup"
    phase_changes: int = 0
    hot: list[Blob] = field(default_factory=list)
    cold: list[Blob] = field(default_factory=list)
    herd_blobs: list[Blob] = field(default_factory=list)
    shared: list[Blob] = field(default_factory=list)
    """Every blob but the herd's: what range and disconnect clients pick."""
    large: list[Blob] = field(default_factory=list)

    def __post_init__(self) -> None:
        blobs = sorted(self.content.blobs, key=lambda blob: blob.size)
        small = [blob for blob in blobs if blob.size <= 256 * 1024]
        self.hot = small[:: max(1, len(small) // 12)][:12]
        middle = [b for b in blobs if 512 * 1024 <= b.size < STALL_MIN_SIZE]
        self.herd_blobs = middle[::2][:30]
        self.herd.blobs = self.herd_blobs
        herd = {blob.digest for blob in self.herd_blobs}
        self.shared = [blob for blob in blobs if blob.digest not in herd]
        hot = {blob.digest for blob in self.hot}
        self.cold = [blob for blob in self.shared if blob.digest not in hot]
        self.large = [b for b in self.shared if b.size >= STALL_MIN_SIZE] or [blobs[-1]]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_changes += 1

    def blob_url(self, blob: Blob) -> str:
        return f"{self.url}/v2/{blob.repository}/blobs/{blob.digest}"


def new_session(*, keep_alive: bool = True) -> aiohttp.ClientSession:
    """One client's connections. Timeouts far above mirror's own (5 s), so
    a client timeout means the mirror left a request hanging (or queued)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=2, force_close=not keep_alive),
        timeout=aiohttp.ClientTimeout(total=90, sock_connect=10, sock_read=30),
        auto_decompress=False,
        trust_env=False,
    )


def _classify(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return TIMEOUT
    if isinstance(
        error,
        aiohttp.ClientPayloadError
        | aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | ConnectionError,
    ):
        return RESET
    return ERROR


class Behaviours:
    """The request each kind makes; one instance per run."""

    def __init__(self, world: World) -> None:
        self.world = world

    def record(
        self,
        kind: str,
        outcome: str,
        *,
        seconds: float | None = None,
        detail: str = "",
        latency: str | None = None,
    ) -> None:
        self.world.tally.add(
            self.world.phase,
            kind,
            outcome,
            seconds=seconds,
            detail=detail,
            latency=latency,
        )

    async def _guard(self, kind: str, request: Callable[[], Awaitable[None]]) -> None:
        """Run one request; count an exception it raises by its class."""
        try:
            await request()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is counted
            outcome = _classify(error)
            self.record(kind, outcome, detail=f"{type(error).__name__}: {error}")

    # --- ordinary clients (aiohttp) -----------------------------------------------

    async def get_blob(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        blob: Blob,
        byte_range: tuple[int, int] | None = None,
        *,
        label: str = "",
    ) -> None:
        """GET a blob (or a range of it) and check every byte. Its latency
        is counted under ``kind`` and ``label`` or the X-Mirror-Cache value."""

        async def request() -> None:
            started = time.monotonic()
            headers = {}
            if byte_range is not None:
                headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
            url = self.world.blob_url(blob)
            async with session.get(url, headers=headers) as response:
                if response.status not in (200, 206):
                    await response.read()
                    self._status(kind, response.status, url)
                    return
                hasher = hashlib.sha256()
                parts: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if response.status == 206:
                        parts.append(chunk)
                    else:
                        hasher.update(chunk)
                self.world.tally.received += size
                cache = response.headers.get("X-Mirror-Cache", "-")
            self.world.tally.cache_headers[kind, cache] += 1
            if response.status == 206:
                assert byte_range is not None
                start = _content_range_start(response.headers.get("Content-Range"))
                want = blob.read(start, start + size)
                right = start == byte_range[0] and b"".join(parts) == want
                right = right and size == byte_range[1] - byte_range[0]
            else:
                right = size == blob.size and f"sha256:{hasher.hexdigest()}" == (
                    blob.digest
                )
            if right:
                self.record(
                    kind,
                    OK,
                    seconds=time.monotonic() - started,
                    latency=f"{kind} {label or cache}",
                )
            else:
                self.record(
                    kind,
                    MISMATCH,
                    detail=f"{url} {response.status} range={byte_range} "
                    f"got {size} bytes of {blob.size} ({cache})",
                )

        await self._guard(kind, request)

    def _status(self, kind: str, status: int, url: str) -> None:
        if status == 503:
            self.record(kind, UNAVAILABLE)
        else:
            self.record(kind, STATUS, detail=f"{url}: HTTP {status}")

    async def manifest(
        self, session: aiohttp.ClientSession, image: Image, rng: random.Random
    ) -> None:
        """GET or HEAD by tag or digest; a GET is followed by the config."""
        reference = rng.choice((image.tag, image.digest))
        method = rng.choice(("GET", "HEAD"))
        url = f"{self.world.url}/v2/{image.repository}/manifests/{reference}"

        async def request() -> None:
            started = time.monotonic()
            async with session.request(
                method, url, headers=MANIFEST_HEADERS
            ) as response:
                body = await response.read()
                if response.status != 200:
                    self._status("manifest", response.status, url)
                    return
                served = response.headers.get("Docker-Content-Digest")
                length = response.headers.get("Content-Length")
            right = served == image.digest and length == str(len(image.manifest))
            if method == "GET":
                right = right and body == image.manifest
            if not right:
                self.record(
                    "manifest",
                    MISMATCH,
                    detail=f"{method} {url}: digest {served}, {len(body)} bytes",
                )
                return
            self.record("manifest", OK, seconds=time.monotonic() - started)

        await self._guard("manifest", request)
        if method == "GET":
            await self.get_blob(session, "manifest", image.config, label="config")

    # --- hostile clients (raw sockets) ------------------------------------------

    async def _connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            async with asyncio.timeout(10):
                await asyncio.get_running_loop().sock_connect(
                    sock, (self.world.host, self.world.port)
                )
        except BaseException:
            sock.close()
            raise
        return sock

    def _request_bytes(self, blob: Blob) -> bytes:
        return (
            f"GET /v2/{blob.repository}/blobs/{blob.digest} HTTP/1.1\r\n"
            f"Host: {self.world.host}:{self.world.port}\r\n"
            "User-Agent: soak\r\n\r\n"
        ).encode()

    async def stall(self, blob: Blob) -> None:
        """Read a little of a large blob, then nothing for 2x send_timeout."""

        async def request() -> None:
            loop = asyncio.get_running_loop()
            sock = await self._connect(STALL_RCVBUF)
            try:
                await loop.sock_sendall(sock, self._request_bytes(blob))
                status, length, rest, cache = await _read_head(
                    sock, within=40, header="x-mirror-cache"
                )
                if status != 200:
                    self._status("stall", status, blob.digest)
                    return
                received = len(rest)
                hasher = hashlib.sha256(rest)
                while received < 64 * 1024:
                    data = await _recv(sock, CHUNK, within=30)
                    if not data:
                        self.record("stall", RESET, detail="closed before the stall")
                        return
                    received += len(data)
                    hasher.update(data)
                changes = self.world.phase_changes
                await asyncio.sleep(2 * self.world.send_timeout + 2)
                # Did the mirror have bytes for us all along?
                strict = cache == "hit" or (
                    self.world.phase == "clean" and self.world.phase_changes == changes
                )
                # The mirror should have given up on us by now: what is left
                # in the buffers comes, then the end, short of the length.
                while received < length:
                    try:
                        data = await _recv(sock, CHUNK, within=self.world.send_timeout)
                    except ConnectionError:
                        data = b""
                    except TimeoutError:
                        self.record(
                            "stall",
                            NOT_CUT,
                            detail=f"{blob.digest}: connection still open, silent, "
                            f"after {received} of {length} bytes",
                        )
                        return
                    if not data:
                        self.record("stall", CUT)
                        return
                    received += len(data)
                    hasher.update(data)
                whole = f"sha256:{hasher.hexdigest()}" == blob.digest
                outcome = MISMATCH if not whole else NOT_CUT if strict else DRAINED
                self.record(
                    "stall",
                    outcome,
                    detail=f"{blob.digest} ({cache}): all {length} bytes arrived "
                    f"after a {2 * self.world.send_timeout + 2:.0f} s stall",
                )
            finally:
                sock.close()

        await self._guard("stall", request)

    async def disconnect(self, blob: Blob, rng: random.Random) -> None:
        """Leave before the headers, or after a random share of the body."""

        async def request() -> None:
            sock = await self._connect()
            try:
                await asyncio.get_running_loop().sock_sendall(
                    sock, self._request_bytes(blob)
                )
                if rng.random() < 0.2:
                    await asyncio.sleep(rng.uniform(0, 0.2))
                    self.record("disconnect", LEFT)
                    return
                status, length, rest, _ = await _read_head(sock, within=40)
                if status != 200:
                    self._status("disconnect", status, blob.digest)
                    return
                goal = int(length * rng.uniform(0.05, 0.9))
                received = len(rest)
                while received < goal:
                    data = await _recv(sock, CHUNK, within=30)
                    if not data:
                        self.record("disconnect", RESET, detail="closed by mirror")
                        return
                    received += len(data)
                self.world.tally.received += received
                self.record("disconnect", LEFT)
            finally:
                if rng.random() < 0.5:  # a reset rather than a FIN
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                sock.close()

        await self._guard("disconnect", request)

    async def slow_header(self, rng: random.Random) -> None:
        """Dribble a request's headers, or go idle after one request; the
        mirror must close the connection about header_timeout later."""
        variant = rng.choice(("dribble", "idle"))
        limit = 3 * self.world.header_timeout

        async def request() -> None:
            loop = asyncio.get_running_loop()
            sock = await self._connect()
            try:
                host = f"Host: {self.world.host}:{self.world.port}\r\n"
                if variant == "idle":
                    await loop.sock_sendall(
                        sock, f"GET /v2/ HTTP/1.1\r\n{host}\r\n".encode()
                    )
                    _, length, rest, _ = await _read_head(sock, within=30)
                    while len(rest) < length:
                        rest += await _recv(sock, length - len(rest), within=30)
                    started = time.monotonic()
                else:
                    started = time.monotonic()
                    await loop.sock_sendall(
                        sock, f"GET /v2/ HTTP/1.1\r\n{host}X-Slow: ".encode()
                    )
                closed = asyncio.ensure_future(_wait_closed(sock, limit))
                try:
                    while not closed.done() and variant == "dribble":
                        await asyncio.wait({closed}, timeout=1.0)
                        if not closed.done():
                            with contextlib.suppress(OSError):
                                await loop.sock_sendall(sock, b"a")
                    at = await closed
                finally:
                    closed.cancel()
                if at is None:
                    self.record(
                        "slowheader",
                        NOT_CLOSED,
                        detail=f"{variant}: still open after {limit:.0f} s",
                    )
                    return
                self.world.tally.close_after[variant].append(at - started)
                self.record("slowheader", CLOSED)
            finally:
                sock.close()

        await self._guard("slowheader", request)


async def _recv(sock: socket.socket, size: int, *, within: float) -> bytes:
    """One recv; b"" at the end. Raises TimeoutError, ConnectionError."""
    async with asyncio.timeout(within):
        return await asyncio.get_running_loop().sock_recv(sock, size)


async def _read_head(
    sock: socket.socket, *, within: float, header: str = ""
) -> tuple[int, int, bytes, str]:
    """Status, Content-Length (0 if none), the body bytes read with the head
    and the value of ``header`` (lower case; "" if absent). Raises
    ConnectionResetError if the connection ends first."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await _recv(sock, 16 * 1024, within=within)
        if not data:
            raise ConnectionResetError("closed before the response head")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, wanted = 0, ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif header and name == header:
            wanted = value.strip()
    return status, length, rest, wanted


async def _wait_closed(sock: socket.socket, limit: float) -> float | None:
    """When the peer closed (or reset) the connection; None after ``limit``.

    Whatever the peer sends first (an error page) is read and ignored.
    """
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = await _recv(sock, 4096, within=left)
        except TimeoutError:
            return None
        except ConnectionError:
            return time.monotonic()
        if not data:
            return time.monotonic()
    return None


def _content_range_start(value: str | None) -> int:
    """The first byte of ``bytes START-END/SIZE``; -1 if missing."""
    if not value or not value.startswith("bytes "):
        return -1
    return int(value[6:].partition("-")[0])


async def client(
    kind: str, number: int, world: World, behaviours: Behaviours, until: float
) -> None:
    """One client: requests of its kind until ``until`` (monotonic)."""
    # Not secrets: a seeded generator makes a run's choices repeatable.
    rng = random.Random(f"{world.seed}/{kind}/{number}")  # noqa: S311
    images = world.content.images
    session = new_session(keep_alive=kind != "herd")
    if kind == "herd":
        world.herd.members += 1
    try:
        # Spread the first requests over a second, not all at t=0.
        await asyncio.sleep(rng.uniform(0, 1))
        while time.monotonic() < until:
            think = rng.uniform(0.05, 0.5)
            if kind == "hit":
                await behaviours.get_blob(session, kind, rng.choice(world.hot))
            elif kind == "miss":
                await behaviours.get_blob(session, kind, rng.choice(world.cold))
                think = rng.uniform(0.2, 1.0)
            elif kind == "herd":
                blob = await world.herd.next(until)
                if blob is None:
                    return
                await behaviours.get_blob(session, kind, blob)
                think = 0
            elif kind == "range":
                blob = rng.choice(world.shared)
                start = rng.randrange(blob.size)
                end = min(blob.size, start + rng.randint(1, MAX_RANGE))
                await behaviours.get_blob(session, kind, blob, (start, end))
            elif kind == "manifest":
                await behaviours.manifest(session, rng.choice(images), rng)
                think = rng.uniform(0.05, 0.3)
            elif kind == "stall":
                await behaviours.stall(rng.choice(world.large))
                think = rng.uniform(0.5, 1.5)
            elif kind == "disconnect":
                await behaviours.disconnect(rng.choice(world.shared), rng)
                think = rng.uniform(0.2, 1.0)
            elif kind == "slowheader":
                await behaviours.slow_header(rng)
                think = rng.uniform(0.2, 1.0)
            else:
                raise ValueError(f"unknown client kind {kind!r}")
            await asyncio.sleep(max(0.0, min(think, until - time.monotonic())))
    finally:
        if kind == "herd":
            world.herd.members -= 1
        await session.close()


async def probe_cached(world: World, cache_dir: Path) -> tuple[float | None, str]:
    """GET one blob that is in the mirror's cache right now; (ms, the
    X-Mirror-Cache it answered), or (None, why not)."""
    by_hex = {blob.digest.removeprefix("sha256:"): blob for blob in world.shared}

    def in_cache() -> list[Blob]:
        try:
            return [
                by_hex[entry.name]
                for directory in os.scandir(cache_dir / "blobs" / "sha256")
                for entry in os.scandir(directory.path)
                if entry.name in by_hex
            ]
        except OSError:
            return []

    cached = await asyncio.to_thread(in_cache)
    if not cached:
        return None, "none cached"
    blob = min(cached, key=lambda blob: blob.size)
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10), trust_env=False
            ) as session,
            session.get(world.blob_url(blob)) as response,
        ):
            body = await response.read()
            cache = response.headers.get("X-Mirror-Cache", "-")
    except (aiohttp.ClientError, TimeoutError) as error:
        return None, type(error).__name__
    if response.status != 200 or len(body) != blob.size:
        return None, f"HTTP {response.status}"
    return round((time.monotonic() - started) * 1000, 1), cache


async def herd_leader(world: World, until: float) -> None:
    """Fire a herd every HERD_INTERVAL seconds or, if the last round is
    still going, as soon as every herd client is back; each on the next
    herd blob."""
    while time.monotonic() + HERD_INTERVAL < until:
        await asyncio.sleep(HERD_INTERVAL)
        if await world.herd.everyone_back(until):
            world.herd.fire(world.phase)
