"""LatencyProxy: a user-space TCP proxy that makes loopback behave like a WAN.

Production upstreams sit behind TLS over a wide-area network: bytes arrive
late, in many small reads, at a capped rate, and sometimes not at all. Over
127.0.0.1 a whole response usually arrives in one read, which hides every bug
that assumes it does. The kernel here has no netem, so this module does it in
user space.

It owns ``LatencyProxy`` and ``Link``. A proxy listens on 127.0.0.1 (a free
port) and relays every connection to one target host and port, as bytes: TLS,
HTTP keep-alive and the target's own request log are untouched. Each
direction of each connection is shaped by a ``Link`` (``request``: client to
target, ``response``: target to client):

* **a delay line**: a chunk read at time t is delivered at t + ``latency``
  (plus up to ``jitter``), in order; latency is not added per chunk, so a
  stream of chunks arrives one latency late, not N latencies;
* **a bandwidth cap** (``rate`` bytes/s per connection and direction);
* **re-segmentation**: the stream is written on in random pieces of 1 to
  ``max_segment`` bytes, with a random pause from the ``pause`` range after a
  ``pause_chance`` share of them, so the receiver sees many short reads.

Randomness comes from a ``random.Random`` per connection and direction,
seeded from ``seed`` and the connection's number: a failing run replays the
same pieces (timing on a loaded machine still varies).

Faults can be switched while it runs: ``cut`` closes connections abruptly
after a number of response bytes, ``stall`` holds responses until
``release``, ``refuse`` closes the port (connections refused) until
``accept``, ``reset`` drops every open connection. ``counters`` tells how
many connections and bytes went through.

The proxy owns one daemon thread running its own asyncio loop, its listening
socket and both sockets of every connection; ``stop()`` (or leaving the
``with`` block) closes them all and joins the thread. Running apart from the
test's loop, it keeps relaying while a test blocks that loop (starting a
subprocess, ``time.sleep``). ``Link`` fields may be changed from any thread
at any time; they apply from the next chunk on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, TypeVar

T = TypeVar("T")
READ_SIZE = 64 * 1024
# How long a cut waits for bytes already written to leave the socket.
FLUSH_TIMEOUT = 5.0
# Pacing sleeps only once this far ahead of the rate: asyncio's timers are
# no finer than a millisecond, and one sleep per small piece would cap the
# rate far below the one asked for.
PACE_QUANTUM = 0.005
# How late a paced sleep may end and still be made up for by sending faster
# afterwards. Sleeps overshoot by more than a timer's millisecond when the
# proxy's thread waits for the GIL (5 ms switch interval) behind the test's.
PACE_CREDIT = 0.05


@dataclass
class Link:
    """How one direction of every connection behaves. Defaults: untouched."""

    latency: float = 0.0
    """Seconds from reading a chunk to delivering it (one way)."""
    jitter: float = 0.0
    """Up to this much more delay per chunk, at random; order is kept."""
    rate: float | None = None
    """Bytes per second per connection; None: as fast as the sockets go."""
    max_segment: int | None = None
    """Write in random pieces of 1..max_segment bytes; None: as read."""
    pause: tuple[float, float] = (0.0, 0.0)
    """Range (seconds) of the pause after a piece, when one is taken."""
    pause_chance: float = 0.0
    """Share of pieces followed by a pause."""


def wan(
    latency: float = 0.02,
    jitter: float = 0.02,
    *,
    rate: float | None = None,
    max_segment: int = 1460,
    pause: tuple[float, float] = (0.0005, 0.002),
    pause_chance: float = 0.02,
) -> Link:
    """A typical WAN direction: 20-40 ms away, MSS-sized or smaller pieces."""
    return Link(latency, jitter, rate, max_segment, pause, pause_chance)


@dataclass(frozen=True)
class Counters:
    """What went through a proxy so far (a snapshot)."""

    connections: int = 0
    """Connections accepted."""
    open: int = 0
    """Connections not yet closed."""
    failed_connects: int = 0
    """Accepted connections whose target could not be reached (closed)."""
    bytes_to_target: int = 0
    """Request bytes delivered."""
    bytes_to_client: int = 0
    """Response bytes delivered."""
    cuts: int = 0
    """Connections closed by ``cut``."""
    stalled: int = 0
    """Connections whose response is being held by ``stall`` right now."""


Direction = Literal["request", "response"]


@dataclass
class _Fault:
    """An armed ``cut`` or ``stall``: how many more connections it takes."""

    after: int
    times: int | None

    def take(self) -> bool:
        """Count one connection hit; False once it has taken all it may."""
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
        return True


class LatencyProxy:
    """Relay 127.0.0.1:<port> to ``target_host:target_port``, shaped.

    ``start()`` before use (it returns once the port listens), ``stop()``
    after; or use it as a context manager. Fault methods and ``counters``
    may be called from any thread while it runs; fault methods return once
    the proxy applies them.
    """

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        request: Link | None = None,
        response: Link | None = None,
        seed: int | str = 0,
        window: int = 1024 * 1024,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.request = request or Link()
        self.response = response or Link()
        self.seed = seed
        # Bytes read ahead per direction and connection, waiting for their
        # delivery time; beyond it the sender meets TCP backpressure.
        self._window_items = max(1, window // READ_SIZE)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._changed = threading.Condition()
        self._counts: dict[str, int] = dict.fromkeys(Counters.__dataclass_fields__, 0)
        self._cut: _Fault | None = None
        self._stall: _Fault | None = None
        self._released: asyncio.Event | None = None
        self.errors: list[BaseException] = []
        """Unexpected exceptions in relaying (bugs here); ``stop()`` raises."""

    # --- addresses ------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: what a client connects to."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://`` + ``host``; a TLS target's clients use https, as the
        proxy relays the handshake untouched."""
        return f"http://{self.host}"

    # --- life cycle -----------------------------------------------------------

    def start(self) -> LatencyProxy:
        """Start the thread and listen; returns self once the port is open.

        Raises OSError if the port cannot be opened.
        """
        if self._thread is not None:
            raise RuntimeError("LatencyProxy already started")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="latency-proxy", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout=10.0)
        except BaseException:
            self._thread.join(timeout=5.0)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Close the port and every connection, then join the thread.

        Raises RuntimeError if relaying hit an unexpected error (a bug in the
        proxy, not a network fault), so a test cannot pass over one.
        """
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10.0)
        thread.join(timeout=10.0)
        self._thread = self._loop = None
        if self.errors:
            raise RuntimeError(f"LatencyProxy failed: {self.errors!r}")

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- faults ---------------------------------------------------------------

    def cut(self, after: int = 0, *, times: int | None = 1) -> None:
        """Close the next ``times`` connections (None: every one) abruptly
        once they have delivered ``after`` more response bytes.

        Open connections count from now, new ones from their first byte. The
        ``after`` bytes are flushed to the client before the close, so it
        really got them. Replaces an earlier ``cut`` still armed.
        """
        self._in_loop(lambda: self._arm("cut", _Fault(after, times)))

    def stall(self, after: int = 0, *, times: int | None = None) -> None:
        """Hold responses after ``after`` more bytes, until ``release()``.

        Applies to open and new connections; ``times`` limits how many
        connections are held (None: all). Requests still flow.
        """
        self._in_loop(lambda: self._arm("stall", _Fault(after, times)))

    def release(self) -> None:
        """End a ``stall``: held responses flow on, new ones are not held."""
        self._in_loop(self._release)

    def refuse(self) -> None:
        """Close the listening port: new connections are refused; open ones
        carry on."""
        self._in_loop(self._close_listener)

    def reset(self) -> None:
        """Close every open connection abruptly, now (both peers see the
        connection drop); with ``refuse`` this is upstream gone."""
        self._in_loop(self._reset)

    def accept(self) -> None:
        """Listen again on the same port after ``refuse()``.

        Raises OSError if the port was taken meanwhile.
        """
        loop = self._running_loop()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10.0)

    # --- counters -------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        with self._changed:
            return Counters(**self._counts)

    def wait_for(
        self, predicate: Callable[[Counters], bool], timeout: float = 10.0
    ) -> Counters:
        """Block until ``predicate(counters)`` holds; return those counters.

        Raises TimeoutError after ``timeout`` seconds. From a coroutine, use
        ``until``.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(counters := Counters(**self._counts)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"proxy counters never matched: {counters}")
                self._changed.wait(left)
            return counters

    async def until(
        self, predicate: Callable[[Counters], bool], *, within: float = 10.0
    ) -> Counters:
        """``wait_for`` without blocking the caller's event loop.

        Raises TimeoutError after ``within`` seconds.
        """
        return await asyncio.to_thread(self.wait_for, predicate, within)

    def _count(self, name: str, delta: int = 1) -> None:
        with self._changed:
            self._counts[name] += delta
            self._changed.notify_all()

    # --- inside the proxy's thread ---------------------------------------------

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._open(ready))
            if ready.exception() is None:
                loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self, ready: concurrent.futures.Future[None]) -> None:
        self._released = asyncio.Event()
        try:
            await self._listen()
        except OSError as error:
            ready.set_exception(error)
            return
        ready.set_result(None)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accepted, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _shutdown(self) -> None:
        self._close_listener()
        self._release()
        for connection in list(self._connections):
            connection.abort()
        # What is left: connections still opening their way to the target.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(others, timeout=1.0) if others else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._running_loop().call_soon(self._running_loop().stop)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LatencyProxy is not running")
        return self._loop

    def _in_loop(self, action: Callable[[], T]) -> T:
        """Run ``action`` in the proxy's loop and return its result."""
        loop = self._running_loop()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(action())
            except Exception as error:  # noqa: BLE001 - handed to the caller
                done.set_exception(error)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=10.0)

    def _arm(self, kind: Literal["cut", "stall"], fault: _Fault) -> None:
        if kind == "cut":
            self._cut = fault
        else:
            self._stall = fault
        for connection in self._connections:
            connection.response_pipe.arm(kind, fault)

    def _reset(self) -> None:
        for connection in list(self._connections):
            connection.abort()

    def _release(self) -> None:
        self._stall = None
        if self._released is not None:
            self._released.set()
            self._released = asyncio.Event()
        for connection in self._connections:
            connection.response_pipe.disarm("stall")

    async def _accepted(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # asyncio reports this task's exception, and a cancellation, as an
        # error in its own callback: everything ends here.
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:  # stop() while connecting upstream
            client_writer.transport.abort()
        except Exception as error:  # noqa: BLE001 - reported by stop()
            self.errors.append(error)
            client_writer.transport.abort()

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self._count("connections")
        number = self._counts["connections"]
        try:
            target_reader, target_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self._count("failed_connects")
            client_writer.transport.abort()
            return
        connection = _Connection(
            self,
            number,
            (client_reader, client_writer),
            (target_reader, target_writer),
        )
        self._connections.add(connection)
        self._count("open")
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self._count("open", -1)


class _ConnectionCut(Exception):
    """Raised in a pipe to end its connection after ``cut``."""


# Errors that end a connection as networks do; anything else is a bug here.
NETWORK_ERRORS = (ConnectionError, OSError, _ConnectionCut)


@dataclass(eq=False)
class _Connection:
    """One accepted client and its connection to the target."""

    proxy: LatencyProxy
    number: int
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    target: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    request_pipe: _Pipe = field(init=False)
    response_pipe: _Pipe = field(init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        seed = f"{self.proxy.seed}/{self.number}"
        self.request_pipe = _Pipe(
            self, "request", self.client[0], self.target[1], f"{seed}/request"
        )
        self.response_pipe = _Pipe(
            self, "response", self.target[0], self.client[1], f"{seed}/response"
        )
        cut, stall = self.proxy._cut, self.proxy._stall
        if cut is not None:
            self.response_pipe.arm("cut", cut)
        if stall is not None:
            self.response_pipe.arm("stall", stall)

    async def run(self) -> None:
        """Relay both ways until both have ended, or the connection broke."""
        self._tasks = [
            asyncio.create_task(coroutine)
            for pipe in (self.request_pipe, self.response_pipe)
            for coroutine in (pipe.read(), pipe.write())
        ]
        try:
            done, _ = await asyncio.wait(
                self._tasks, return_when=asyncio.FIRST_EXCEPTION
            )
            errors = [
                error
                for task in done
                if not task.cancelled() and (error := task.exception()) is not None
            ]
            if errors:
                self.abort()
            self.proxy.errors.extend(
                e for e in errors if not isinstance(e, NETWORK_ERRORS)
            )
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for _, writer in (self.client, self.target):
                writer.close()

    def abort(self) -> None:
        """Close both sockets at once, dropping what is buffered, and end
        every task of the connection (held or waiting ones too)."""
        for _, writer in (self.client, self.target):
            writer.transport.abort()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


@dataclass(eq=False)
class _Pipe:
    """One direction of a connection: a reader filling a delay line and a
    writer emptying it on time, in pieces."""

    connection: _Connection
    direction: Direction
    source: asyncio.StreamReader
    sink: asyncio.StreamWriter
    seed: str
    # (delivery time, chunk); b"" is the end of the stream, None a reset.
    line: asyncio.Queue[tuple[float, bytes | None]] = field(init=False)
    # Separate generators for the reader and the writer, so the numbers each
    # draws do not depend on how the two tasks interleave.
    delays: random.Random = field(init=False)
    pieces: random.Random = field(init=False)
    # Response bytes left before a cut or a stall begins, while one is armed.
    cut_left: int | None = None
    stall_left: int | None = None
    cut_fault: _Fault | None = None
    stall_fault: _Fault | None = None
    _last_due: float = 0.0
    _free_at: float = 0.0
    _paced: bool = False  # this burst slept for its rate: oversleeping is made up

    def __post_init__(self) -> None:
        self.line = asyncio.Queue(self.connection.proxy._window_items)
        # Not secrets: reproducible shaping.
        self.delays = random.Random(self.seed + "/delays")  # noqa: S311
        self.pieces = random.Random(self.seed + "/pieces")  # noqa: S311

    @property
    def link(self) -> Link:
        proxy = self.connection.proxy
        return proxy.request if self.direction == "request" else proxy.response

    def arm(self, kind: Literal["cut", "stall"], fault: _Fault) -> None:
        if kind == "cut":
            self.cut_fault, self.cut_left = fault, fault.after
        else:
            self.stall_fault, self.stall_left = fault, fault.after

    def disarm(self, kind: Literal["cut", "stall"]) -> None:
        if kind == "cut":
            self.cut_fault = self.cut_left = None
        else:
            self.stall_fault = self.stall_left = None

    async def read(self) -> None:
        """Read chunks as they come and stamp each with its delivery time."""
        loop = asyncio.get_running_loop()
        while True:
            data: bytes | None
            try:
                data = await self.source.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = None  # a reset: deliver what came before, then reset
            link = self.link
            delay = link.latency
            if link.jitter:
                delay += self.delays.uniform(0, link.jitter)
            # Never before the chunk ahead of it: order is kept.
            self._last_due = max(self._last_due, loop.time() + delay)
            await self.line.put((self._last_due, data))
            if not data:
                return

    async def write(self) -> None:
        """Deliver each chunk at its time, in pieces, paced; then pass the
        end (or the reset) on."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.line.get()
            await _sleep_until(loop, due)
            if data is None:
                raise ConnectionResetError(f"{self.direction} source reset")
            if not data:
                if self.sink.can_write_eof() and not self.sink.is_closing():
                    self.sink.write_eof()
                return
            view = memoryview(data)
            while view:
                link = self.link
                size = len(view)
                if link.max_segment is not None:
                    size = min(size, self.pieces.randint(1, max(1, link.max_segment)))
                size = await self._allowed(size)
                self.sink.write(view[:size])
                view = view[size:]
                await self.sink.drain()
                self._delivered(size)
                if self.cut_left == 0:
                    await self._cut()
                await self._pace(loop, size, link)

    async def _allowed(self, size: int) -> int:
        """How much of ``size`` may go now: waits out a stall, and ends a
        piece at the byte where a cut or a stall begins."""
        proxy = self.connection.proxy
        while self.stall_left == 0 and self.stall_fault is not None:
            if not self.stall_fault.take():
                self.disarm("stall")
                break
            released = proxy._released
            assert released is not None
            proxy._count("stalled")
            try:
                await released.wait()
            finally:
                proxy._count("stalled", -1)
        if self.cut_left == 0:
            await self._cut()
        for left in (self.cut_left, self.stall_left):
            if left is not None:
                size = min(size, left)
        return size

    def _delivered(self, size: int) -> None:
        if self.cut_left is not None:
            self.cut_left -= size
        if self.stall_left is not None:
            self.stall_left -= size
        name = "bytes_to_target" if self.direction == "request" else "bytes_to_client"
        self.connection.proxy._count(name, size)

    async def _cut(self) -> None:
        """Close the connection, if the armed cut still takes one.

        Raises _ConnectionCut when it does.
        """
        fault = self.cut_fault
        assert fault is not None
        if not fault.take():
            self.disarm("cut")
            return
        proxy = self.connection.proxy
        if fault.times == 0 and proxy._cut is fault:
            proxy._cut = None
        await _flushed(self.sink)
        proxy._count("cuts")
        self.connection.abort()
        raise _ConnectionCut

    async def _pace(
        self, loop: asyncio.AbstractEventLoop, size: int, link: Link
    ) -> None:
        if link.rate:
            # Idle time earns no credit beyond PACE_CREDIT: a burst after a
            # longer pause is paced from its start. A pacing sleep that
            # overshot is made up for by sending faster afterwards, rather
            # than lost (so a pause shorter than PACE_CREDIT within a burst
            # is made up for too).
            now = loop.time()
            if now - self._free_at >= PACE_CREDIT:
                self._paced = False  # idle: a new burst
            base = self._free_at if self._paced else max(self._free_at, now)
            self._free_at = base + size / link.rate
            if self._free_at - now >= PACE_QUANTUM:
                self._paced = True
                await _sleep_until(loop, self._free_at)
        if link.pause_chance and self.pieces.random() < link.pause_chance:
            await asyncio.sleep(self.pieces.uniform(*link.pause))


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _flushed(writer: asyncio.StreamWriter) -> None:
    """Wait (briefly) until what was written has left the transport's buffer.

    asyncio signals "below the low-water mark", never "empty": poll.
    """
    deadline = time.monotonic() + FLUSH_TIMEOUT
    transport = writer.transport
    while transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
