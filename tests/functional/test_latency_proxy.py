"""Self-tests of LatencyProxy (tests/fakes/network.py), with no mirror involved.

If these fail, the network the other tests run on is not what they think it
is. Each test relays between a client and a small server in the test's own
event loop; the proxy runs in its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from tests.conftest import ProxyFactory
from tests.fakes.network import Link, wan

KiB = 1024


@dataclass
class Sink:
    """A server that answers each connection with ``reply`` and records
    what it was sent."""

    reply: bytes = b""
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            writer.write(self.reply)
            writer.write_eof()
            self.received.append(await reader.read())
        except ConnectionError:
            pass  # the proxy cut the connection: what the test is about
        finally:
            writer.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    target = Sink()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    target.port = server.sockets[0].getsockname()[1]
    try:
        yield target
    finally:
        server.close()
        await server.wait_closed()


def pattern(size: int) -> bytes:
    """Bytes in which any reordering or loss shows."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


@contextlib.asynccontextmanager
async def connected(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def exchange(
    port: int, request: bytes, *, on_read: Callable[[bytes], None] | None = None
) -> bytes:
    """Send ``request``, half-close, and read the answer to its end."""
    async with connected(port) as (reader, writer):
        writer.write(request)
        writer.write_eof()
        answer = bytearray()
        while data := await reader.read(64 * KiB):
            if on_read is not None:
                on_read(data)
            answer += data
        return bytes(answer)


async def timed(coroutine: Awaitable[bytes]) -> tuple[bytes, float]:
    start = time.monotonic()
    result = await coroutine
    return result, time.monotonic() - start


async def test_bytes_arrive_whole_in_order_and_in_many_reads(
    sink: Sink, latency_proxy: ProxyFactory
) -> None:
    sink.reply = pattern(300 * KiB)
    request = pattern(40 * KiB)[::-1]
    shaped = Link(max_segment=512, pause=(0.0005, 0.001), pause_chance=0.05)
    proxy = latency_proxy(sink.port, request=shaped, response=shaped)
    reads: list[int] = []

    answer = await exchange(proxy.port, request, on_read=lambda d: reads.append(len(d)))

    assert answer == sink.reply
    assert sink.received == [request]
    # Unshaped, loopback delivers this in a handful of reads.
    assert len(reads) > 50, reads
    assert max(reads) <= 64 * KiB
    counters = proxy.counters
    assert (counters.connections, counters.failed_connects) == (1, 0)
    assert counters.bytes_to_target == len(request)
    assert counters.bytes_to_client == len(sink.reply)


async def test_latency_is_a_delay_line_not_a_delay_per_chunk(
    latency_proxy: ProxyFactory,
) -> None:
    """Fifty chunks sent 2 ms apart arrive 100 ms late each, not 5 s late."""
    arrivals: list[float] = []
    done = asyncio.Event()

    async def record(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await reader.read(1):
                arrivals.append(time.monotonic())
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    try:
        proxy = latency_proxy(
            server.sockets[0].getsockname()[1], request=Link(latency=0.1)
        )
        sent: list[float] = []
        async with connected(proxy.port) as (_, writer):
            for _ in range(50):
                sent.append(time.monotonic())
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.002)
        await asyncio.wait_for(done.wait(), 5.0)
    finally:
        server.close()
        await server.wait_closed()

    assert len(arrivals) == 50
    delays = [arrived - left for arrived, left in zip(arrivals, sent, strict=True)]
    assert min(delays) >= 0.1 - 0.005, delays  # timer granularity
    assert max(delays) < 0.3, delays


async def test_bandwidth_is_capped_per_connection(
    sink: Sink, latency_proxy: ProxyFactory
) -> None:
    sink.reply = pattern(256 * KiB)
    proxy = latency_proxy(sink.port, response=Link(rate=1024 * KiB))

    answer, seconds = await timed(exchange(proxy.port, b"go"))

    assert answer == sink.reply
    assert 0.24 <= seconds < 2.0, seconds
    # Changed while running: applies from the next chunk on.
    proxy.response.rate = None
    answer, seconds = await timed(exchange(proxy.port, b"go"))
    assert answer == sink.reply
    assert seconds < 0.2


async def test_cut_closes_a_connection_after_exactly_n_response_bytes(
    sink: Sink, latency_proxy: ProxyFactory
) -> None:
    sink.reply = pattern(200 * KiB)
    proxy = latency_proxy(sink.port, response=Link(max_segment=4096))
    proxy.cut(after=50_001)

    received = bytearray()
    async with connected(proxy.port) as (reader, writer):
        writer.write(b"go")
        with contextlib.suppress(ConnectionError):  # a reset, or else EOF
            while data := await reader.read(64 * KiB):
                received += data
    assert bytes(received) == sink.reply[:50_001]
    assert proxy.counters.cuts == 1

    # times=1: the next connection is whole.
    assert await exchange(proxy.port, b"again") == sink.reply
    assert proxy.counters.cuts == 1


async def test_stall_holds_responses_until_released(
    sink: Sink, latency_proxy: ProxyFactory
) -> None:
    sink.reply = pattern(100 * KiB)
    proxy = latency_proxy(sink.port)
    proxy.stall(after=1000)

    async with connected(proxy.port) as (reader, writer):
        writer.write(b"go")
        writer.write_eof()
        head = await reader.readexactly(1000)
        await proxy.until(lambda c: c.stalled == 1, within=5.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        proxy.release()
        rest = await asyncio.wait_for(reader.read(), 5.0)

    assert head + rest == sink.reply
    assert proxy.counters.stalled == 0
    # Released: new connections flow.
    assert await exchange(proxy.port, b"again") == sink.reply


async def test_refuse_closes_the_port_and_accept_reopens_it(
    sink: Sink, latency_proxy: ProxyFactory
) -> None:
    sink.reply = b"hello"
    proxy = latency_proxy(sink.port)
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    proxy.accept()
    assert proxy.port == port
    assert await exchange(port, b"hi") == b"hello"
    assert proxy.counters.connections == 1


async def test_unreachable_target_closes_the_client(
    latency_proxy: ProxyFactory,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    proxy = latency_proxy(dead_port)
    received = b"?"
    async with connected(proxy.port) as (reader, _):
        with contextlib.suppress(ConnectionError):  # a reset, or else EOF
            received = await asyncio.wait_for(reader.read(1), 5.0)
    assert received in (b"?", b"")
    counters = await proxy.until(lambda c: c.failed_connects == 1, within=5.0)
    assert counters.open == 0


def test_relays_while_the_callers_thread_is_blocked(
    latency_proxy: ProxyFactory,
) -> None:
    """No event loop of the caller's is needed: blocking sockets, one thread."""
    reply = pattern(64 * KiB)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(16)
            connection.sendall(reply)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        proxy = latency_proxy(listener.getsockname()[1], response=wan(latency=0.01))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0) as sock:
            sock.sendall(b"go")
            received = bytearray()
            while data := sock.recv(64 * KiB):
                received += data
        assert bytes(received) == reply
    finally:
        server.join(timeout=5.0)
        listener.close()
