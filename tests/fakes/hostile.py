"""HostileRegistry: a FakeRegistry that can be told to misbehave in one way.

It is a `FakeRegistry` (same content, token flow, request log and knobs) with
one extra middleware. A test sets `misbehave` to a `Fault`, and every request
the fault matches (by kind: manifest, blob, tags, token; optionally by a
predicate) is answered the hostile way instead:

* `Rewrite` takes the answer the registry would have given and changes it at
  the byte level: status, header values (raw bytes, so control characters and
  non-UTF-8 that aiohttp refuses to send are possible), the body, a lying
  Content-Length, or a connection cut mid-headers. It is written straight to
  the socket, then the connection is closed.
* `Stream` sends a body chunk by chunk, never built in memory: `size` filler
  bytes (100 MB token answers, 200 MB tag lists), or the real body paced and
  chunked. The bytes it managed to send are counted in `sent`, so a test can
  tell how much the mirror actually read.

Independent of the fault, `hidden` makes content 404 in one repository only,
and `hold` keeps a repository's requests waiting, to line up races.
"""

from __future__ import annotations

import asyncio
import gzip
import http
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes.registry import FakeRegistry, Logged

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 64 * 1024
# Headers a raw answer always decides itself.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class Answer:
    """A plain, complete answer: what the registry would have sent."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, kw_only=True)
class Fault:
    """Which requests misbehave: by kind (Logged.kind) and `when`."""

    kinds: frozenset[str]
    when: Callable[[web.Request], bool] | None = None

    def matches(self, request: web.Request) -> bool:
        kind = Logged(request.method, request.path, {}).kind
        return kind in self.kinds and (self.when is None or self.when(request))

    async def answer(
        self, fake: HostileRegistry, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Rewrite(Fault):
    """The normal answer, changed byte for byte and sent raw.

    `headers` replaces (or adds) header values; `{host}` in a value becomes
    the request's Host. `drop` removes headers, `add` appends more (repeats
    allowed). `body` maps the normal body to the one sent. Content-Length is
    the sent body's length unless set in `headers` (a lie) or dropped (then
    the body ends when the connection closes). `cut` sends only the first
    `cut` bytes of the whole response, headers included.
    """

    status: int | None = None
    headers: dict[str, bytes] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    add: tuple[tuple[bytes, bytes], ...] = ()
    body: Callable[[bytes], bytes] | None = None
    cut: int | None = None

    async def answer(
        self, fake: HostileRegistry, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        normal = await fake.plain_answer(request, handler)
        body = self.body(normal.body) if self.body else normal.body
        replaced = {name.lower() for name in self.headers}
        dropped = {name.lower() for name in self.drop}
        headers = [
            (name, value)
            for name, value in normal.headers
            if name.decode().lower() not in _FRAMING | replaced | dropped
        ]
        host = request.host.encode()
        headers += [
            (name.encode(), value.replace(b"{host}", host))
            for name, value in self.headers.items()
        ]
        headers += list(self.add)
        if "content-length" not in replaced | dropped:
            headers.append((b"Content-Length", str(len(body)).encode()))
        headers.append((b"Connection", b"close"))
        raw = serialize(self.status or normal.status, headers)
        if request.method != "HEAD":
            raw += body
        if self.cut is not None:
            raw = raw[: self.cut]
        return await send_raw(request, raw)


@dataclass(frozen=True, kw_only=True)
class Stream(Fault):
    """A 200 whose body is streamed: `size` filler bytes, or (size None) the
    normal body. With `length`, Content-Length is declared; otherwise the
    body is chunked. `pace` seconds pass between chunks."""

    size: int | None = None
    length: bool = True
    pace: float = 0.0
    content_type: str | None = None

    async def answer(
        self, fake: HostileRegistry, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        kind = Logged(request.method, request.path, {}).kind
        normal = await fake.plain_answer(request, handler)
        total = len(normal.body) if self.size is None else self.size
        content_type = self.content_type or _header(normal, b"content-type")
        response = web.StreamResponse(headers={"Content-Type": content_type})
        if self.length:
            response.content_length = total
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        filler = b" " * CHUNK
        try:
            for offset in range(0, total, CHUNK):
                if self.size is None:
                    chunk = normal.body[offset : offset + CHUNK]
                else:
                    chunk = filler[: min(CHUNK, total - offset)]
                await response.write(chunk)
                fake.sent[kind] += len(chunk)
                if self.pace:
                    await asyncio.sleep(self.pace)
            await response.write_eof()
        except ConnectionError:
            pass  # the mirror stopped reading and hung up: what we want to see
        return response


def gzipped(*kinds: str) -> Rewrite:
    """Bodies gzipped with `Content-Encoding: gzip`, and no digest header
    (so only the mirror's own hashing could notice)."""
    return Rewrite(
        kinds=frozenset(kinds),
        headers={"Content-Encoding": b"gzip"},
        drop=frozenset({"Docker-Content-Digest"}),
        body=gzip.compress,
    )


def redirect(location: str, *kinds: str) -> Rewrite:
    """307 to `location`, as Docker Hub does for blobs only."""
    return Rewrite(
        kinds=frozenset(kinds),
        status=307,
        headers={"Location": location.encode()},
        drop=frozenset({"Content-Type", "Docker-Content-Digest"}),
        body=lambda _body: b"",
    )


def html_error(status: int, *kinds: str) -> Rewrite:
    """An error page from a proxy in front of the registry."""
    page = b"<html><body><h1>%d</h1><p>Bad gateway</p></body></html>" % status
    return Rewrite(
        kinds=frozenset(kinds),
        status=status,
        headers={"Content-Type": b"text/html"},
        drop=frozenset({"Docker-Content-Digest"}),
        body=lambda _body: page,
    )


@dataclass
class HostileRegistry(FakeRegistry):
    """A FakeRegistry plus `misbehave`, `hidden`, `hold` and `sent`."""

    misbehave: Fault | None = None
    # (repository, digest) pairs answered 404, for that repository only.
    hidden: set[tuple[str, str]] = field(default_factory=set)
    # Requests for a repository wait for its event before being answered.
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    # Body bytes a Stream fault got onto the wire, by kind.
    sent: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        app = super().app()
        # Runs after FakeRegistry's own middleware (log, stall, auth).
        app.middlewares.append(self._hostile)
        return app

    @web.middleware
    async def _hostile(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        name = request.match_info.get("name")
        if name is not None:
            event = self.hold.get(name)
            if event is not None:
                await event.wait()
            ref = request.match_info.get("digest") or request.match_info.get(
                "reference"
            )
            if (name, ref) in self.hidden:
                return _not_found(request)
        fault = self.misbehave
        if fault is not None and fault.matches(request):
            return await fault.answer(self, request, handler)
        return await handler(request)

    async def plain_answer(self, request: web.Request, handler: Handler) -> Answer:
        """The answer the registry would give, whole, without sending it."""
        digest = request.match_info.get("digest")
        if "/blobs/" in request.path and digest in self.blobs:
            # The blob handler streams; build its plain answer here instead.
            data = self.blobs[digest]
            return Answer(
                200,
                [
                    (b"Content-Type", b"application/octet-stream"),
                    (b"Docker-Content-Digest", digest.encode()),
                    (b"Content-Length", str(len(data)).encode()),
                ],
                data if request.method == "GET" else b"",
            )
        response = await handler(request)
        assert isinstance(response, web.Response), response
        body = response.body
        assert body is None or isinstance(body, bytes), body
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()]
        if request.method == "HEAD":
            # A HEAD's plain answer has the GET's length and no body.
            return Answer(response.status, headers, b"")
        return Answer(response.status, headers, body or b"")


def serialize(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A status line and header block, bytes as given."""
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Whatever"
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def send_raw(request: web.Request, raw: bytes) -> web.StreamResponse:
    """Write `raw` to the socket as the whole answer, and close it.

    aiohttp then fails to send the response returned here on the closing
    transport, which it treats as a client gone: quietly.
    """
    transport = request.transport
    assert transport is not None
    transport.write(raw)
    transport.close()
    return web.Response()


def _header(answer: Answer, name: bytes) -> str:
    for key, value in answer.headers:
        if key.lower() == name:
            return value.decode()
    return "application/octet-stream"


def _not_found(request: web.Request) -> web.Response:
    code = "BLOB_UNKNOWN" if "/blobs/" in request.path else "MANIFEST_UNKNOWN"
    return web.json_response(
        {"errors": [{"code": code, "message": code.lower(), "detail": None}]},
        status=404,
    )
