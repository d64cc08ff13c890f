"""Fuzzing the mirror's HTTP surface with arbitrary bytes over real sockets.

The mirror runs as in production, under `mirror.api.server.serve` on
127.0.0.1, in front of a FakeRegistry holding two small images (one already
cached, so requests meet hits as well as misses). Hypothesis runs in a worker
thread and hands each request to the test's event loop, which writes it with
raw asyncio streams: method, target, version and headers can be any bytes.

Every answer must be a success that is right (a blob or manifest that hashes
to its digest, a range that is the right slice), or an OCI JSON error
envelope with a 4xx, or a 503/504 blamed on upstream. No log record may carry
a traceback, nothing may be written outside the cache directory, and
afterwards `mirror verify` must find the cache clean.

Bounded for CI: a fixed number of examples, derandomized, no example
database, and every exchange has its own timeout instead of a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mirror import ops
from mirror.api.errors import ErrorCode
from mirror.api.server import serve
from mirror.app import CACHE, METRICS, create_app
from mirror.config import Address, Config, load_config
from tests.conftest import FakeClock
from tests.fakes.registry import FakeRegistry, Image

T = TypeVar("T")
EXCHANGE_TIMEOUT = 10.0
# The mirror's error table; UNKNOWN is its 500, never a right answer here.
OCI_CODES = frozenset(c.code for c in ErrorCode) - {ErrorCode.UNKNOWN.code}
LOOPBACK_ANY = Address("127.0.0.1", 0)
# Endpoints that answer something other than registry content.
PLAIN_ENDPOINTS = (
    "/metrics",
    "/healthz",
    "/readyz",
    "/v2/",
    "/v2",
    "/",
    "/status.json",
)


def layer(n: int, size: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (size // 32)


# --- the mirror, served as in production ----------------------------------------


class Captured(logging.Handler):
    """Keeps the records a production log would show with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            with self._lock:
                self.records.append(record)

    def take(self) -> list[str]:
        with self._lock:
            found = [f"{r.name}: {r.getMessage()}" for r in self.records]
            self.records.clear()
        return found


@dataclass
class Served:
    """A mirror under `serve()` on the test's loop, and its upstream."""

    loop: asyncio.AbstractEventLoop
    port: int
    app: web.Application
    config: Config
    blobs: dict[str, bytes]
    cached_image: Image
    uncached_image: Image

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the mirror's loop, from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture
async def served(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> AsyncIterator[Served]:
    upstream = FakeRegistry()
    cached_image = upstream.push_image(
        "library/app", "1", [layer(1, 40_000), layer(2, 70_000)]
    )
    uncached_image = upstream.push_image("library/new", "2", [layer(3, 90_000)])
    upstream_server = await aiohttp_server(upstream.app())
    # Deep inside tmp_path, so a path that escapes it lands where we look.
    cache_dir = tmp_path / "var" / "lib" / "cache"
    (tmp_path / "outside.txt").write_text("must stay as it is\n")
    env = {
        "MIRROR_UPSTREAM_URL": str(upstream_server.make_url("")).rstrip("/"),
        "MIRROR_CACHE_DIR": str(cache_dir),
        "MIRROR_UPSTREAM_RETRY_BACKOFF": "0s",
        "MIRROR_UPSTREAM_DOWN_BACKOFF": "0s",
    }
    config = load_config(None, env)
    # server.listen refuses port 0; the ephemeral port goes in after parsing.
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, listen=LOOPBACK_ANY)
    )
    clock = FakeClock()
    app = create_app(config, clock=clock, monotonic=clock)
    loop = asyncio.get_running_loop()
    bound: asyncio.Future[int] = loop.create_future()
    task = asyncio.create_task(
        serve(app, config, app[METRICS], started=bound.set_result)
    )
    try:
        async with asyncio.timeout(15):
            port = await asyncio.shield(bound)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for path in [
                "/v2/library/app/manifests/1",
                *(f"/v2/library/app/blobs/{d}" for d in cached_image.blobs),
            ]:
                async with session.get(path) as resp:
                    assert resp.status == 200
                    await resp.read()
        await app[CACHE].idle()
        yield Served(
            loop,
            port,
            app,
            config,
            dict(upstream.blobs),
            cached_image,
            uncached_image,
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # serve() leaves its signal handlers behind; not past this test.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        loop.set_exception_handler(None)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    loggers = [logging.getLogger(name) for name in ("aiohttp", "mirror")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        # The mirror's default log.level: what an operator would see.
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of everything under `root` but `skip`."""
    found = {}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in [*files, *dirs]:
            stat = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return found


# --- talking raw HTTP -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last one of a name wins
    body: bytes


async def exchange(port: int, raw: bytes, head: bool) -> Reply | None:
    """Send `raw`, read one response; None if the server closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        while True:
            try:
                block = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                partial = exc.partial
                if partial:
                    raise AssertionError(f"half a response: {partial!r}") from None
                return None
            lines = block.decode("latin-1").split("\r\n")
            # aiohttp answers in the version asked (even HTTP/2.0); any will do.
            match = re.fullmatch(r"HTTP/\d\.\d (\d{3})( .*)?", lines[0])
            assert match, f"bad status line {lines[0]!r}"
            status = int(match.group(1))
            headers = {}
            for line in lines[1:]:
                if line:
                    name, sep, value = line.partition(":")
                    assert sep, f"bad header line {line!r}"
                    headers[name.strip().lower()] = value.strip()
            if status >= 200:
                break  # past any 100 Continue
        return Reply(
            status, headers, await _body(reader, headers, head or status in (204, 304))
        )
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _body(
    reader: asyncio.StreamReader, headers: dict[str, str], none: bool
) -> bytes:
    if none:
        return b""
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


# --- what to send -------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VISIBLE = "".join(chr(c) for c in range(0x20, 0x7F))
ODD_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30
).map(lambda t: t.encode())
ASCII_TEXT = st.text(VISIBLE, max_size=30).map(str.encode)
# What may stand in a request target as is: visible ASCII but the space.
URL_TEXT = st.text(VISIBLE[1:], max_size=30).map(str.encode)


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    sep: bytes = b" "

    def raw(self) -> bytes:
        line = self.method + self.sep + self.target + self.sep + self.version
        fields = [b"Host: 127.0.0.1"] * (
            not any(n.lower() == b"host" for n, _ in self.headers)
        )
        fields += [n + b": " + v for n, v in self.headers]
        fields.append(b"Connection: close")
        return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """one_of with weights (one_of itself ignores repeated strategies)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def _percent(data: bytes) -> bytes:
    return b"".join(b"%%%02X" % c for c in data)


def _targets(
    served: Served, odd: st.SearchStrategy[bytes], *, unparsable: bool
) -> st.SearchStrategy[bytes]:
    """/v2/ paths, mostly about content the fake has (so hits and misses both
    happen), some names and references odd in every way; `unparsable` adds
    targets aiohttp's parser refuses (too long, `*` for a GET)."""
    images = [served.cached_image, served.uncached_image]
    digests = [d for image in images for d in (image.digest, *image.blobs)]
    known_name = st.sampled_from(
        [b"library/app", b"app", b"library/new", b"new", b"library/missing"]
    )
    name = weighted(
        (6, known_name),
        (1, st.sampled_from([b"", b"..", b"a/../../b", b"a//b", b"-a", b"a" * 300])),
        (1, odd),
    )
    known_reference = st.one_of(
        st.sampled_from([d.encode() for d in digests]),
        st.sampled_from([b"1", b"2", b"latest"]),
    )
    reference = weighted(
        (6, known_reference),
        (1, odd),
        (
            1,
            st.sampled_from(
                [
                    b"sha256:" + b"0" * 64,
                    b"sha512:" + b"f" * 128,
                    b"sha256:" + b"A" * 64,
                    b"sha256:abc",
                    b"md5:d41d8cd98f00b204e9800998ecf8427e",
                    b"sha256:",
                    b":",
                    b"x" * 200,
                ]
            ),
        ),
    )
    section = st.sampled_from(
        [b"manifests"] * 3
        + [b"blobs"] * 3
        + [b"tags", b"blobs/uploads", b"referrers", b"x"]
    )
    v2 = st.builds(
        lambda n, s, r, escape: (
            b"/v2/"
            + (_percent(n) if escape == 1 else n)
            + b"/"
            + s
            + b"/"
            + (_percent(r) if escape == 2 else r)
        ),
        name,
        section,
        reference,
        st.integers(0, 5),
    )
    tags = st.builds(lambda n: b"/v2/" + n + b"/tags/list", name)
    other = st.sampled_from(
        [
            b"/v2/",
            b"/v2",
            b"/metrics",
            b"/healthz",
            b"/readyz",
            b"/",
            b"http://127.0.0.1/v2/",
            b"//v2//library/app//manifests//1",
            b"/v2/%2e%2e/%2e%2e/etc/passwd",
            b"/v2/library/app/manifests/1%00",
            b"/v2/library/app/blobs/sha256%3A" + b"0" * 64,
            b"/v2/" + b"a/" * 3000 + b"manifests/1",
            *[b"*", b"/" + b"a" * 9000, b"/v2/" + b"b/" * 5000 + b"blobs/x"]
            * unparsable,
        ]
    )
    query = weighted(
        (6, st.just(b"")),
        (
            1,
            st.sampled_from(
                [b"?ns=docker.io", b"?ns=quay.io", b"?n=1", b"?n=-1&last=%ff", b"?ns="]
            ),
        ),
        (1, st.builds(lambda q: b"?" + _percent(q), odd)),
    )
    exact = st.sampled_from(
        [
            f"/v2/{image.repository}/{kind}/{reference}".encode()
            for image in images
            for kind, reference in [
                ("manifests", image.tag),
                ("manifests", image.digest),
                *(("blobs", d) for d in image.blobs),
            ]
        ]
    )
    targets = weighted((4, exact), (4, v2), (1, tags), (1, other))
    return st.builds(lambda t, q: t + q, targets, query)


def _range_values(odd: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    number = st.one_of(st.integers(-10, 400_000), st.integers(-10, 10**30)).map(
        lambda i: str(i).encode()
    )
    return st.one_of(
        st.sampled_from(
            [
                b"bytes=-0",
                b"bytes=5-2",
                b"bytes=0-0,5-10",
                b"bytes=0-",
                b"bytes=-1",
                b"bytes=1-1",
                b"bytes=",
                b"bytes=abc",
                b"items=0-1",
                b"bytes = 0-1",
                b"bytes=99999999999999999999999-",
                b"bytes=-99999999999999999999",
                b"bytes=0-" + b"9" * 400,
                b"bytes=0-1,2-3,4-5,6-7,8-9",
            ]
        ),
        st.builds(lambda a, b: b"bytes=" + a + b"-" + b, number, number),
        st.builds(lambda a: b"bytes=" + a + b"-", number),
        st.builds(lambda a: b"bytes=-" + a, number),
        odd,
    )


def _headers(
    names: st.SearchStrategy[bytes],
    values: st.SearchStrategy[bytes],
    *,
    unparsable: bool,
) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Up to four headers, half of them Range; `unparsable` adds what
    aiohttp's parser refuses: values over 8190 bytes, framing headers."""
    common = st.sampled_from(
        [
            b"Accept",
            b"Accept-Encoding",
            b"Authorization",
            b"If-None-Match",
            b"If-Range",
            b"Expect",
            b"X-Forwarded-For",
            # Framing and Host: a bad value or a repeat is a parser error.
            *[b"Content-Length", b"Transfer-Encoding", b"Host"] * unparsable,
        ]
    )
    framing = (b"connection", b"content-length", b"transfer-encoding", b"host")
    name = st.one_of(common, names).filter(
        lambda n: (
            n.lower() != b"connection" and (unparsable or n.lower() not in framing)
        )
    )
    value = st.one_of(
        st.sampled_from(
            [b"", b"*/*", b"gzip", b"chunked", b"100-continue", b"0", b"-1", b"1"]
        ),
        values,
        st.just(b"x" * (10_000 if unparsable else 8000)),
    )
    return st.lists(
        weighted(
            (1, st.tuples(st.just(b"Range"), _range_values(values))),
            (1, st.tuples(name, value)),
        ),
        max_size=4,
    )


def well_formed(served: Served) -> st.SearchStrategy[Request]:
    """HTTP/1.1 that aiohttp parses, so it reaches the mirror's handlers:
    mostly GET and HEAD for content the fake has, odd names and references,
    Range headers of every shape."""
    return st.builds(
        Request,
        st.sampled_from([b"GET"] * 6 + [b"HEAD"] * 3 + [b"POST", b"DELETE", b"PUT"]),
        _targets(
            served,
            st.one_of(URL_TEXT, ODD_TEXT.map(_percent)),
            unparsable=False,
        ),
        st.just(b"HTTP/1.1"),
        _headers(
            st.text(TCHARS, min_size=1, max_size=20).map(str.encode),
            ASCII_TEXT,
            unparsable=False,
        ),
    )


def malformed(served: Served) -> st.SearchStrategy[Request]:
    """Anything at all in the method, target, version, separators and
    headers: mostly aiohttp's own parser errors."""
    anything = st.one_of(ODD_TEXT, st.binary(max_size=20))
    return st.builds(
        Request,
        st.one_of(
            st.sampled_from(
                [b"GET", b"HEAD", b"PUT", b"OPTIONS", b"TRACE", b"CONNECT", b"PRI"]
            ),
            # aiohttp's parser knows the registered methods only.
            st.sampled_from([b"get", b"BREW", b"M-SEARCH", b"G\x00T", b""]),
            st.text(TCHARS, min_size=1, max_size=12).map(str.encode),
            st.binary(max_size=8),
        ),
        st.one_of(_targets(served, anything, unparsable=True), st.binary(max_size=40)),
        st.sampled_from(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 x", b""]
        ),
        _headers(st.binary(min_size=1, max_size=10), anything, unparsable=True),
        st.sampled_from([b" ", b"  ", b"\t"]),
    )


# --- what must come back --------------------------------------------------------------


def check_reply(request: Request, reply: Reply, served: Served) -> None:
    head = request.method == b"HEAD"
    path = _path(request.target)
    context = f"{request.raw()[:300]!r} -> {reply.status} {reply.body[:300]!r}"
    if reply.status in (200, 206):
        check_success(served, request, reply, head, context)
        return
    assert 400 <= reply.status < 500 or reply.status in (503, 504), context
    assert reply.headers.get("content-type", "").startswith("application/json"), context
    if head:
        return
    doc = json.loads(reply.body)
    assert isinstance(doc, dict), context
    assert isinstance(doc.get("errors"), list), context
    assert doc["errors"], context
    for error in doc["errors"]:
        assert error["code"] in OCI_CODES, context
        assert isinstance(error["message"], str), context
    if reply.status in (503, 504):
        assert doc["errors"][0]["code"] == "UNAVAILABLE", context
    if path in ("/metrics", "/healthz", "/readyz") and request.method == b"GET":
        raise AssertionError(f"a plain endpoint failed: {context}")


def _path(target: bytes) -> str:
    """The path of an origin-form or absolute-form request target."""
    text = target.decode("latin-1")
    return urlsplit(text).path if "://" in text else text.partition("?")[0]


def check_success(
    served: Served, request: Request, reply: Reply, head: bool, context: str
) -> None:
    assert request.method in (b"GET", b"HEAD"), context
    digest = reply.headers.get("docker-content-digest")
    if digest is None:
        path = _path(request.target)
        assert path in PLAIN_ENDPOINTS or path.endswith("/tags/list"), context
        return
    if head:
        return
    if reply.status == 200:
        algorithm, _, hexdigest = digest.partition(":")
        assert hashlib.new(algorithm, reply.body).hexdigest() == hexdigest, context
        return
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", reply.headers["content-range"])
    assert match, context
    start, end, size = map(int, match.groups())
    blob = served.blobs[digest]
    assert size == len(blob), context
    assert reply.body == blob[start : end + 1], context


# --- the test -------------------------------------------------------------------------


def well_formed_examples(served: Served) -> list[Request]:
    """Always tried: every Range shape on a cached and an uncached blob, and
    an unknown Expect where no route of ours answers."""
    cached = f"/v2/library/app/blobs/{served.cached_image.layers[0]}".encode()
    fresh = f"/v2/library/new/blobs/{served.uncached_image.layers[0]}".encode()
    ranges = [
        b"bytes=-0",
        b"bytes=5-2",
        b"bytes=0-0,5-10",
        b"bytes=99999999999999999999999-",
        b"bytes=-99999999999999999999",
        b"bytes=0-" + b"9" * 400,
        b"bytes=10-",
        b"bytes=-10",
    ]
    return [
        *(
            Request(b"GET", path, b"HTTP/1.1", [(b"Range", r)])
            for path in (fresh, cached)
            for r in ranges
        ),
        # No route for the method, or none at all: aiohttp's 417, not ours.
        Request(b"POST", b"/v2", b"HTTP/1.1", [(b"Expect", b"x<script>")]),
        Request(b"GET", b"/nowhere", b"HTTP/1.1", [(b"Expect", b"*/*")]),
    ]


def malformed_examples(served: Served) -> list[Request]:
    """Always tried: what aiohttp's parser refuses before the mirror sees it."""
    v2 = b"/v2/library/app/manifests/1"
    return [
        Request(b"GET", b"", b"HTTP/1.1", []),
        Request(b"BREW", v2, b"HTTP/1.1", []),
        Request(b"GET", v2, b"HTTP/1.1 x", []),
        Request(b"GET", b"/" + b"a" * 9000, b"HTTP/1.1", []),
        Request(b"GET", v2, b"HTTP/1.1", [(b"X-Big", b"x" * 10_000)]),
        Request(b"GET", v2, b"HTTP/1.1", [(b"Content-Length", b"-1")]),
        Request(b"GET", v2 + b"\xff<script>", b"HTTP/1.1", []),
    ]


@pytest.mark.parametrize(
    ("strategy", "known", "examples"),
    [(well_formed, well_formed_examples, 250), (malformed, malformed_examples, 150)],
)
async def test_fuzzed_requests_get_oci_answers_and_leave_the_cache_sound(
    served: Served,
    captured: Captured,
    tmp_path: Path,
    strategy: Callable[[Served], st.SearchStrategy[Request]],
    known: Callable[[Served], list[Request]],
    examples: int,
) -> None:
    cache_dir = served.config.cache.dir
    before = snapshot(tmp_path, cache_dir)
    captured.take()

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,  # EXCHANGE_TIMEOUT bounds each example instead
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(request=strategy(served))
    def one(request: Request) -> None:
        captured.take()  # what a previous, failing example left
        head = request.method == b"HEAD"
        reply = served.run(
            asyncio.wait_for(
                exchange(served.port, request.raw(), head), EXCHANGE_TIMEOUT
            ),
            EXCHANGE_TIMEOUT + 5,
        )
        assert reply is not None, f"no answer to {request.raw()[:300]!r}"
        check_reply(request, reply, served)
        assert captured.take() == [], request.raw()[:300]

    for request in known(served):
        one = example(request=request)(one)
    # Hypothesis blocks; the mirror runs on this loop meanwhile.
    await asyncio.to_thread(one)

    await served.app[CACHE].idle()
    assert captured.take() == []
    assert snapshot(tmp_path, cache_dir) == before
    report = await ops.verify(served.config.cache)
    assert report.removed == []
    assert report.rows_dropped == 0
    assert report.adopted == 0
    assert report.checked >= len(served.cached_image.blobs)
