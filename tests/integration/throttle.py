"""A bandwidth-limited TCP relay, to keep an upstream download in flight.

This module owns ``ThrottledRelay``: it listens on 127.0.0.1 and forwards
every connection to a target port (the distribution registry), passing
requests through at full speed and responses at no more than ``rate`` bytes
per second per connection. Over loopback the registry sends a 30 MB blob in
a fraction of a second; behind the relay the same download takes seconds,
long enough for a test to look at the mirror's temp files or kill it.

The relay works on bytes, not HTTP, so the registry and the mirror talk to
each other exactly as they would directly; the registry's own request log
still records every request. It runs in threads of its own, so it keeps
relaying while a test blocks its event loop (``MirrorProcess.start``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 16 * 1024


@dataclass
class ThrottledRelay:
    """Relay 127.0.0.1:<port> to 127.0.0.1:<target_port>, responses slowed.

    ``rate`` (bytes per second, per connection) may be changed while the
    relay runs; it applies from the next chunk on.
    """

    target_port: int
    rate: float
    port: int = 0
    _listener: socket.socket | None = None
    _sockets: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        """Close every socket and wait (briefly) for the relay threads."""
        self._closed.set()
        with self._lock:
            sockets = [s for s in (self._listener, *self._sockets) if s is not None]
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=5.0)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            self._track(client)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._track(server)
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        """Copy until either side closes; when ``slow``, at most ``rate`` B/s."""
        due = 0.0
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
                if slow:
                    # Each chunk earns its own pause; idle time on a kept-alive
                    # connection is no credit, so every response is slow.
                    due = max(due, time.monotonic()) + len(data) / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
        except OSError:
            pass
        finally:
            # Pass the close on, so HTTP keep-alive peers notice.
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
