"""The listener over real sockets: `mirror.api.server.serve` in-process.

Each test runs `serve()` as an asyncio task on 127.0.0.1 (an ephemeral port,
reported through `started`) in front of a FakeRegistry, and talks to it with
raw asyncio streams or sockets where the client is meant to misbehave: hold
connections, dribble headers, send malformed HTTP, stop reading a blob.
Stopping a mirror is cancelling its task; the fixture checks that this ends
it promptly and cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.fakes.registry import FakeRegistry, sha256
from tests.functional.conftest import Served, ServeFactory, stop_serving

MiB = 1024 * 1024
BIG = 48 * MiB

ServerFactory = Callable[..., Awaitable[TestServer]]


# --- raw HTTP -----------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    def error_code(self) -> str:
        parsed = self.json()
        assert isinstance(parsed, dict), self.body
        code = parsed["errors"][0]["code"]
        assert isinstance(code, str)
        return code


def request(
    path: str = "/v2/", *, headers: dict[str, str] | None = None, close: bool = False
) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(
    reader: asyncio.StreamReader, *, within: float = 5.0
) -> RawResponse:
    """One response with a Content-Length body."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawResponse(int(status_line.split()[1]), headers, body)


async def exchange(port: int, data: bytes, *, within: float = 5.0) -> RawResponse:
    """Send `data` on a fresh connection; the response, read to EOF."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        response = await read_response(reader, within=within)
        async with asyncio.timeout(within):
            rest = await reader.read()
        assert rest == b"", f"bytes after the response: {rest[:200]!r}"
        return response
    finally:
        writer.close()


async def read_to_eof(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything until the server closes (a reset counts as closed).

    Raises TimeoutError if the connection is still open after `within`.
    """
    data = bytearray()
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk


def assert_oci(response: RawResponse, status: int, *codes: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json"), response
    assert response.error_code() in codes, response


async def metrics_page(served: Served) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def metric_line(text: str, prefix: str) -> float:
    """The value of the sample line starting with `prefix` (name{labels})."""
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    pytest.fail(f"no sample {prefix} in /metrics:\n{text}")


def blob_data(seed: str, size: int) -> bytes:
    """Reproducible bytes that don't compress: a failure can be replayed."""
    return random.Random(seed).randbytes(size)  # noqa: S311 - not a secret


async def get_blob(
    served: Served, digest: str, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.get(served.url + served.blob_path(digest), headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def stalled_blob_client(port: int, path: str) -> socket.socket:
    """A client that asks for `path` with a tiny receive buffer and then
    reads nothing: everything the server sends piles up on its side."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request(path))
    return sock


async def drain_socket(sock: socket.socket, within: float) -> int:
    """Read until EOF or reset; how many bytes arrived. Raises TimeoutError
    if the server keeps the connection open past `within`."""
    loop = asyncio.get_running_loop()
    total = 0
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await loop.sock_recv(sock, MiB)
            except ConnectionResetError:
                return total
            if not chunk:
                return total
            total += len(chunk)


# --- stopping ------------------------------------------------------------------


async def test_cancelling_serve_closes_listener_and_connections(
    start: ServeFactory,
) -> None:
    served = await start()
    reader, writer = await connect(served.port)
    writer.write(request())
    assert (await read_response(reader)).status == 200  # now idle, kept alive

    began = asyncio.get_running_loop().time()
    await stop_serving(served.task)
    assert asyncio.get_running_loop().time() - began < 5.0
    assert await read_to_eof(reader, within=1.0) == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await connect(served.port)


async def test_serve_leaves_no_signal_handlers(start: ServeFactory) -> None:
    """A serve() that ended must not keep SIGTERM/SIGINT routed to it: in a
    process that serves again (or a test run), Ctrl-C would be swallowed."""
    loop = asyncio.get_running_loop()
    served = await start()
    await stop_serving(served.task)
    leftover = [
        signum.name
        for signum in (signal.SIGTERM, signal.SIGINT)
        if loop.remove_signal_handler(signum)
    ]
    assert leftover == [], f"serve() left handlers for {leftover} installed"


# --- 1. the connection limit ---------------------------------------------------


async def test_connection_limit_refuses_with_503_and_recovers(
    start: ServeFactory,
) -> None:
    served = await start(server_max_connections="3")
    held = []
    for _ in range(3):
        reader, writer = await connect(served.port)
        writer.write(request())
        assert (await read_response(reader)).status == 200  # admitted, now idle
        held.append((reader, writer))
    assert served.sample("mirror_http_connections") == 3

    reader, writer = await connect(served.port)
    writer.write(request())
    refused = await read_response(reader, within=2.0)
    assert_oci(refused, 503, "UNAVAILABLE")
    assert refused.headers["retry-after"] == "1"
    assert await read_to_eof(reader, within=2.0) == b""
    writer.close()

    _, held_writer = held.pop()
    held_writer.close()
    await served.until("mirror_http_connections", 2, within=2.0)
    reader, writer = await connect(served.port)
    writer.write(request())
    assert (await read_response(reader)).status == 200
    writer.write(request("/metrics"))
    page = (await read_response(reader)).body.decode()
    writer.close()
    limit = 'mirror_http_connections_rejected_total{reason="limit"}'
    assert metric_line(page, limit) == 1
    assert metric_line(page, "mirror_http_connections") == 3  # 2 held + this one
    for _, held_writer in held:
        held_writer.close()


async def test_refused_connection_that_sends_nothing_is_answered(
    start: ServeFactory,
) -> None:
    served = await start(server_max_connections="1")
    _, holder = await connect(served.port)
    await served.until("mirror_http_connections", 1, within=2.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await connect(served.port)
    data = await read_to_eof(reader, within=3.0)
    assert loop.time() - began < 2.0
    assert data.startswith(b"HTTP/1.1 503 "), data
    writer.close()
    holder.close()


# --- 2. the header timeout ------------------------------------------------------


async def test_slow_headers_are_cut_off(start: ServeFactory) -> None:
    served = await start(server_header_timeout="300ms")
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await connect(served.port)
    # 60 bytes at 10 a second would take 6 s to complete.
    slow = request(headers={"User-Agent": "slowloris" * 4})[:60]

    async def dribble() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in slow:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

    dribbler = asyncio.create_task(dribble())
    try:
        data = await read_to_eof(reader, within=1.5)
    finally:
        dribbler.cancel()
        writer.close()
    elapsed = loop.time() - began
    assert data == b""  # closed, not answered
    assert 0.25 < elapsed < 1.5, elapsed


async def test_idle_connection_is_closed(start: ServeFactory) -> None:
    served = await start(server_header_timeout="300ms")
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await connect(served.port)
    assert await read_to_eof(reader, within=1.5) == b""
    assert 0.25 < loop.time() - began < 1.5
    writer.close()
    await served.until("mirror_http_connections", 0, within=1.0)


async def test_slow_second_request_is_cut_off(start: ServeFactory) -> None:
    """The timeout restarts after each response, and covers the next
    request's headers too."""
    served = await start(server_header_timeout="300ms")
    loop = asyncio.get_running_loop()
    reader, writer = await connect(served.port)
    writer.write(request())
    assert (await read_response(reader)).status == 200
    began = loop.time()
    with contextlib.suppress(ConnectionError):
        for byte in request()[:20]:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
            if reader.at_eof() or writer.is_closing():
                break
    data = await read_to_eof(reader, within=1.5)
    writer.close()
    assert data == b""
    assert loop.time() - began < 1.5


async def test_keep_alive_client_within_the_timeout_is_unaffected(
    start: ServeFactory,
) -> None:
    served = await start(server_header_timeout="300ms")
    reader, writer = await connect(served.port)
    # Five requests span longer than the timeout: it runs from each
    # response, not from the connection's start.
    for _ in range(5):
        writer.write(request())
        response = await read_response(reader)
        assert response.status == 200
        assert response.headers.get("connection", "").lower() != "close"
        await asyncio.sleep(0.1)
    writer.close()


# --- 3. malformed HTTP -----------------------------------------------------------

LONG_PATH = b"/" + b"L" * 10_000
MALFORMED = {
    "long request line": b"GET " + LONG_PATH + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-ASCII path": b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "control character in a header": (
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Probe: ab\x01cd\r\n\r\n"
    ),
    "NUL in a header": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Probe: ab\x00cd\r\n\r\n",
    "unknown method token": b"FO(O /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage line": b"\x16\x03\x01\x02\x00garbage-here\r\n\r\n",
    "bare LF": b"GET /v2/ HTTP/1.1\nHost: x\n\n",
}
# Bytes of each request that must not come back in its response.
ECHOES = {
    "long request line": [b"LLLLLLLL"],
    "non-ASCII path": [b"\xff\xfe", b"\\xff"],
    "control character in a header": [b"ab\x01cd", b"X-Probe"],
    "NUL in a header": [b"ab\x00cd", b"X-Probe"],
    "unknown method token": [b"FO(O"],
    "garbage line": [b"garbage-here"],
    "bare LF": [b"Host: x"],
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request_gets_an_oci_error(
    start: ServeFactory, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="mirror")  # whatever others set
    served = await start()
    response = await exchange(served.port, MALFORMED[case])
    assert 400 <= response.status < 500, response
    assert_oci(response, response.status, "BAD_REQUEST")
    raw = response.body + repr(response.headers).encode()
    for echo in ECHOES[case]:
        assert echo not in raw, f"response echoes {echo!r}: {response}"
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]


async def test_malformed_requests_are_logged_at_a_limited_rate(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="mirror")  # whatever others set
    served = await start()
    for _ in range(5):
        for data in MALFORMED.values():
            response = await exchange(served.port, data)
            assert response.status == 400
    # Still serving properly afterwards.
    assert (await exchange(served.port, request(close=True))).status == 200
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]


# --- 4. the access log --------------------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mirror.access" and marker in r.getMessage()
    ]


async def test_access_log_escapes_the_user_agent(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    served = await start()
    # A quote, a backslash, a tab (the one control character HTTP allows in
    # a header value), raw obs-text and UTF-8.
    agent = b'evil/1 "quoted" back\\slash tab\there \x80raw caf\xc3\xa9'
    data = (
        b"GET /v2/?marker=ua1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"User-Agent: " + agent + b"\r\n\r\n"
    )
    assert (await exchange(served.port, data)).status == 200
    lines = _access_lines(caplog, "marker=ua1")
    assert len(lines) == 1, lines
    line = lines[0]
    assert all(" " <= char <= "~" for char in line), repr(line)
    assert line.endswith(
        r'"evil/1 \"quoted\" back\\slash tab\x09here \udc80raw caf\xe9"'
    ), line
    # The quoted field cannot be closed early: the only unescaped quotes
    # are the four that delimit the request line and the User-Agent.
    assert line.replace('\\"', "").count('"') == 4, line


async def test_access_log_never_carries_an_escape_character(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """ESC in a header value is refused by aiohttp's parser (400); whatever is
    logged for it must hold no raw control character."""
    caplog.set_level(logging.INFO, logger="mirror.access")
    served = await start()
    data = (
        b"GET /v2/?marker=ua2 HTTP/1.1\r\nHost: x\r\n"
        b'User-Agent: a"b\\c\x1b[31mred\r\n\r\n'
    )
    response = await exchange(served.port, data)
    assert response.status in (200, 400), response
    lines = [r.getMessage() for r in caplog.records if r.name == "mirror.access"]
    assert len(lines) == 1, lines
    assert all(" " <= char <= "~" for char in lines[0]), repr(lines[0])


async def test_access_log_escapes_the_request_line(
    start: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    served = await start()
    data = request('/v2/?marker=rl"x\\y', close=True)
    assert (await exchange(served.port, data)).status == 200
    lines = _access_lines(caplog, "marker=rl")
    assert len(lines) == 1, lines
    assert '"GET /v2/?marker=rl\\"x\\\\y HTTP/1.1"' in lines[0], lines[0]


# --- 5, 6. the send timeout ------------------------------------------------------


async def test_stalled_client_of_a_cached_blob_is_dropped(start: ServeFactory) -> None:
    upstream = FakeRegistry()
    data = blob_data("cached", BIG)
    digest = upstream.add_blob(data)
    served = await start(upstream, server_send_timeout="500ms")
    status, headers, body = await get_blob(served, digest)
    assert (status, sha256(body)) == (200, digest)
    await served.settle()
    assert (await get_blob(served, digest))[1]["X-Mirror-Cache"] == "hit"
    await served.settle()

    sock = await stalled_blob_client(served.port, served.blob_path(digest))
    try:
        await served.until("mirror_http_send_timeouts_total", 1, within=5.0)
        received = await drain_socket(sock, within=5.0)
    finally:
        sock.close()
    assert received < BIG
    status, headers, body = await get_blob(served, digest)
    assert (status, headers["X-Mirror-Cache"], sha256(body)) == (200, "hit", digest)
    assert served.sample("mirror_http_send_timeouts_total") == 1
    assert upstream.count("blob", "GET") == 1


async def test_stalled_client_of_a_download_is_dropped_and_the_blob_cached(
    start: ServeFactory,
) -> None:
    upstream = FakeRegistry()
    data = blob_data("streamed", BIG)
    digest = upstream.add_blob(data)
    served = await start(upstream, server_send_timeout="500ms")

    sock = await stalled_blob_client(served.port, served.blob_path(digest))
    try:
        await served.until("mirror_http_send_timeouts_total", 1, within=10.0)
        received = await drain_socket(sock, within=5.0)
    finally:
        sock.close()
    assert received < BIG
    await served.settle()
    status, headers, body = await get_blob(served, digest)
    assert (status, headers["X-Mirror-Cache"], sha256(body)) == (200, "hit", digest)
    assert upstream.count("blob", "GET") == 1
    assert served.sample("mirror_http_send_timeouts_total") == 1


# --- 7. Range on both paths ---------------------------------------------------------

SIZE = 200_000
UNSATISFIABLE = ["bytes=-0", "bytes=5-2", "bytes=0-1,4-5", "bytes=abc", "bytes=200000-"]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("header", UNSATISFIABLE)
async def test_unsatisfiable_range_is_416(
    start: ServeFactory, cached: bool, header: str
) -> None:
    upstream = FakeRegistry()
    digest = upstream.add_blob(blob_data(header, SIZE))
    served = await start(upstream)
    if cached:
        assert (await get_blob(served, digest))[0] == 200
        await served.settle()
    status, headers, body = await get_blob(served, digest, headers={"Range": header})
    assert status == 416, (status, headers, body[:200])
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    assert headers["Content-Range"] == f"bytes */{SIZE}"
    assert upstream.count("blob", "GET") == 1  # the uncached one did go upstream


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=0-", 0, SIZE - 1),
        ("bytes=-999999", 0, SIZE - 1),
        ("bytes=100-199", 100, 199),
        ("bytes=199990-300000", 199990, SIZE - 1),
    ],
)
async def test_satisfiable_range_is_206(
    start: ServeFactory, cached: bool, header: str, first: int, last: int
) -> None:
    upstream = FakeRegistry()
    data = blob_data(header, SIZE)
    digest = upstream.add_blob(data)
    served = await start(upstream)
    if cached:
        assert (await get_blob(served, digest))[0] == 200
        await served.settle()
    status, headers, body = await get_blob(served, digest, headers={"Range": header})
    assert status == 206, (status, headers, body[:200])
    assert headers["X-Mirror-Cache"] == ("hit" if cached else "miss")
    assert headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert body == data[first : last + 1]
    assert upstream.count("blob", "GET") == 1


# --- 8. many stalled clients ----------------------------------------------------


async def test_many_stalled_clients_neither_hang_nor_leak(start: ServeFactory) -> None:
    served = await start(server_max_connections="50", server_header_timeout="1s")
    loop = asyncio.get_running_loop()
    began = loop.time()
    stalled = []
    for _ in range(200):
        reader, writer = await connect(served.port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0")
        stalled.append((reader, writer))

    # A fresh client is answered at once: 200, or 503 while the slots are held.
    fresh_began = loop.time()
    fresh = await exchange(served.port, request(close=True), within=2.0)
    assert fresh.status in (200, 503), fresh
    assert loop.time() - fresh_began < 2.0

    outcomes = await asyncio.gather(
        *(read_to_eof(reader, within=4.0) for reader, _ in stalled)
    )
    assert loop.time() - began < 4.0
    for _, writer in stalled:
        writer.close()
    refused = [data for data in outcomes if data.startswith(b"HTTP/1.1 503 ")]
    dropped = [data for data in outcomes if data == b""]
    assert len(refused) == 150, {data[:40] for data in outcomes}
    assert len(dropped) == 50, {data[:40] for data in outcomes}

    await served.until("mirror_http_connections", 0, within=2.0)
    page = await metrics_page(served)
    assert metric_line(page, "mirror_http_connections") == 1  # the scrape itself
    limit = 'mirror_http_connections_rejected_total{reason="limit"}'
    assert metric_line(page, limit) >= 150
    assert (await exchange(served.port, request(close=True))).status == 200
