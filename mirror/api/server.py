"""The listener: the HTTP server around the app, and the bounds it keeps.

aiohttp's `web.run_app` is convenient but has no notion of a connection
limit, answers malformed requests in plain text that echoes the request (and
logs a traceback each), and writes client-chosen strings into the access log
as they are. `serve()` runs the same app with:

* **A connection limit** (`server.max_connections`). A connection past it is
  answered `503 UNAVAILABLE` with `Retry-After: 1` and closed, so clients
  back off and retry instead of hanging in the accept queue. The limit is
  lowered at start to what the process's file-descriptor limit can hold,
  after the soft limit is raised to the hard one (as Go programs do).
* **A header timeout** (`server.header_timeout`): a connection that has not
  sent a complete request this long after connecting, or after its last
  response, is closed; slow-header (slowloris) and idle connections alike.
* **OCI errors for malformed HTTP**: an over-long request line, raw
  non-ASCII, an unknown method... get a JSON envelope and one rate-limited
  log line, never a traceback and never an echo of the request.
* **Out of file descriptors**: asyncio's accept loop reports EMFILE through
  the loop's exception handler, once per failed accept with a traceback;
  here it becomes one warning a minute and a metric.
* **An escaped access log**: the request line and User-Agent are escaped
  and cut short, so a client cannot forge log lines.
* **HTTPS** when `server.tls_cert` and `server.tls_key` are set, reloaded
  on SIGHUP and when the files change (see mirror/tls.py); a TLS handshake
  must finish within `server.header_timeout` too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from mirror.api.clients import CLIENT
from mirror.api.errors import API_VERSION_HEADER, ErrorCode, error_response
from mirror.config import Config, small_blob_slots
from mirror.logutil import OncePer, escape
from mirror.metrics import Metrics
from mirror.tls import ServerTls

log = logging.getLogger(__name__)
access_log = logging.getLogger("mirror.access")

# File descriptors kept free of client connections: the database, the
# listening sockets, logs, and headroom for what a request opens briefly.
_RESERVED_FDS = 64
# A client connection may hold its socket and a cached blob's file.
_FDS_PER_CONNECTION = 2
# A download holds its upstream socket, its temp file for writing and one
# for reading.
_FDS_PER_DOWNLOAD = 3
# How long a refused connection may take to send its request line before
# the 503 goes out anyway (answering before the request arrives can make
# the kernel reset the connection, and the client never sees the 503).
_REFUSE_WAIT = 1.0
# Refused connections waiting like that, at most; they hold descriptors out
# of the reserve, so past this many a refusal is answered at once.
_MAX_WAITING_REFUSALS = 32
# How long in-flight requests get to finish at shutdown.
SHUTDOWN_TIMEOUT = 30.0


def _refusal() -> bytes:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": ErrorCode.UNAVAILABLE.code,
                    "message": "mirror is at its connection limit; retry shortly",
                    "detail": None,
                }
            ]
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Retry-After": "1",
        **API_VERSION_HEADER,
        "Connection": "close",
    }
    head = "HTTP/1.1 503 Service Unavailable\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return (head + "\r\n").encode() + body


_REFUSAL = _refusal()


class ConnectionLimit:
    """Counts client connections; at `limit`, new ones are refused."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.open = 0
        self.refusing = 0  # refused connections waiting for their request
        self._metrics = metrics
        self._warning = OncePer(60.0)

    def admit(self) -> bool:
        if self.open >= self.limit:
            self._metrics.http_connections_rejected.labels("limit").inc()
            if self._warning.ready():
                log.warning(
                    "at server.max_connections (%d): refusing new connections with 503",
                    self.limit,
                )
            return False
        self.open += 1
        self._metrics.http_connections.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self._metrics.http_connections.set(self.open)


class _Handler(RequestHandler):
    """aiohttp's connection handler, with the limit and OCI error pages."""

    def __init__(
        self, limit: ConnectionLimit, bad_requests: OncePer, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._limit = limit
        self._bad_requests = bad_requests
        self._refused: asyncio.Transport | None = None
        self._waiting = False  # a refusal counted in ConnectionLimit.refusing
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Counted here and in connection_lost, which asyncio always pairs
        # (a factory call may not be followed by either, e.g. a TLS
        # handshake that fails).
        if not self._limit.admit():
            assert isinstance(transport, asyncio.Transport)  # noqa: S101 - asyncio's
            self._refused = transport
            if self._limit.refusing >= _MAX_WAITING_REFUSALS:
                self._refuse()
                return
            self._limit.refusing += 1
            self._waiting = True
            asyncio.get_running_loop().call_later(_REFUSE_WAIT, self._refuse)
            return
        self._admitted = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._refuse()  # the request has started: answer it
            return
        super().data_received(data)

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self._limit.refusing -= 1

    def _refuse(self) -> None:
        self._stop_waiting()
        transport, self._refused = self._refused, None
        if transport is not None and not transport.is_closing():
            transport.write(_REFUSAL)
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_waiting()
        self._refused = None
        if not self._admitted:
            return
        self._admitted = False
        self._limit.release()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors (malformed requests, handler crashes) as an
        OCI envelope; the connection is closed after it."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            log.error("error answering %s", request.remote, exc_info=exc)
            response = error_response(
                ErrorCode.UNKNOWN, "internal error", status=status
            )
        else:
            if self._bad_requests.ready():
                log.info(
                    "malformed request from %s: %s",
                    request.remote,
                    escape(str(message or exc or "bad request"), 120),
                )
            response = error_response(
                ErrorCode.BAD_REQUEST, "malformed HTTP request", status=status
            )
        response.force_close()
        return response


class AccessLogger(AbstractAccessLogger):
    """`remote "METHOD path HTTP/x.y" status bytes seconds "User-Agent"`,
    with the client-chosen parts escaped."""

    def log(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float
    ) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        version = f"{request.version.major}.{request.version.minor}"
        line = f"{request.method} {request.path_qs} HTTP/{version}"
        self.logger.info(
            '%s "%s" %d %d %.6f "%s"',
            # The client behind a trusted proxy, when there is one.
            request.get(CLIENT) or request.remote,
            escape(line, 512),
            response.status,
            response.body_length,
            time,
            escape(request.headers.get("User-Agent", "-"), 256),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def connection_budget(config: Config) -> int:
    """server.max_connections, lowered to what RLIMIT_NOFILE can hold after
    raising the soft limit as far as the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    upstream = config.upstream
    spare = (
        soft
        - _RESERVED_FDS
        - _FDS_PER_DOWNLOAD
        * (upstream.max_downloads + small_blob_slots(upstream.max_downloads))
        - upstream.max_connections
    )
    fits = max(1, spare // _FDS_PER_CONNECTION)
    wanted_connections = config.server.max_connections
    if fits < wanted_connections:
        log.warning(
            "server.max_connections lowered from %d to %d: the file descriptor "
            "limit is %d (raise LimitNOFILE / ulimit -n)",
            wanted_connections,
            fits,
            soft,
        )
        return fits
    return wanted_connections


def _loop_exception_handler(
    metrics: Metrics,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """Turn asyncio's per-accept EMFILE report into a line a minute."""
    warning = OncePer(60.0)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            metrics.http_connections_rejected.labels("fds").inc()
            if warning.ready():
                log.warning(
                    "cannot accept connections: %s (raise LimitNOFILE, or "
                    "lower server.max_connections)",
                    context.get("exception"),
                )
            return
        loop.default_exception_handler(context)

    return handler


async def serve(
    app: web.Application,
    config: Config,
    metrics: Metrics,
    *,
    on_reload: Callable[[], None] | None = None,
    started: Callable[[int], None] | None = None,
    admin: web.Application | None = None,
    admin_started: Callable[[int], None] | None = None,
) -> None:
    """Serve `app` on config.server.listen until SIGTERM or SIGINT (or until
    cancelled).

    `on_reload` is called on SIGHUP, after the TLS certificate (if any) was
    reloaded; `started(port)` once listening (the port matters when
    listening on port 0). `admin`, the operations app, is served on
    server.admin_listen (`admin_started(port)` once listening). Raises
    OSError if an address cannot be bound, TlsError if a certificate does
    not load.
    """
    tls = _server_tls(config, metrics)
    admin_tls = _admin_tls(config, metrics) if admin is not None else None
    tlses = [t for t in (tls, admin_tls) if t is not None]
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_loop_exception_handler(metrics))
    limit = ConnectionLimit(connection_budget(config), metrics)
    handler_args: dict[str, Any] = {
        "keepalive_timeout": config.server.header_timeout,
        "access_log_class": AccessLogger,
        "access_log": access_log if config.log.access_log else None,
    }
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,  # a client that leaves frees what it held
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **handler_args,
    )
    await runner.setup()
    stop = asyncio.Event()
    signals = [signal.SIGTERM, signal.SIGINT]
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if on_reload is not None or tlses:

        def hangup() -> None:
            for each in tlses:
                each.reload()
            if on_reload is not None:
                on_reload()

        signals.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, hangup)
    bad_requests = OncePer(60.0)

    def protocol() -> RequestHandler:
        assert runner.server is not None  # noqa: S101 - set by setup()
        return _Handler(
            limit, bad_requests, manager=runner.server, loop=loop, **handler_args
        )

    listen = config.server.listen
    try:
        server = await loop.create_server(
            protocol,
            host=listen.host,
            port=listen.port,
            backlog=1024,
            ssl=tls.context if tls is not None else None,
            ssl_handshake_timeout=config.server.header_timeout if tls else None,
        )
    except OSError as exc:
        await runner.cleanup()
        _restore(loop, signals, previous_handler)
        raise ListenError(f"server.listen {listen}", exc) from exc
    admin_runner = None
    watchers = []
    interval = config.server.tls_watch_interval
    if interval > 0:
        watchers = [
            asyncio.create_task(each.watch(interval), name="tls watch")
            for each in tlses
        ]
    try:
        if admin is not None:
            admin_runner = await _serve_admin(admin, config, admin_tls)
            if admin_started is not None:
                admin_started(_bound_port(admin_runner))
        if started is not None:
            started(server.sockets[0].getsockname()[1])
        await stop.wait()
        log.info("shutting down")
    finally:
        for watcher in watchers:
            watcher.cancel()
        if admin_runner is not None:
            await admin_runner.cleanup()
        server.close()  # no new connections; runner.cleanup ends the open ones
        await runner.cleanup()
        await server.wait_closed()
        _restore(loop, signals, previous_handler)


def _server_tls(config: Config, metrics: Metrics) -> ServerTls | None:
    """The listener's TLS, when a certificate is configured. Raises TlsError."""
    server = config.server
    if server.tls_cert is None or server.tls_key is None:
        return None
    reloads = metrics.tls_reloads
    return ServerTls(
        server.tls_cert,
        server.tls_key,
        server.client_ca,
        on_reload=lambda ok: reloads.labels("ok" if ok else "failed").inc(),
    )


class ListenError(OSError):
    """An address could not be bound; `str()` says which and why."""

    def __init__(self, what: str, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot listen on {what}: {cause.strerror}")


def _admin_tls(config: Config, metrics: Metrics) -> ServerTls | None:
    """The admin listener's TLS, if it has a certificate. Raises TlsError."""
    server = config.server
    if server.admin_tls_cert is None or server.admin_tls_key is None:
        return None
    reloads = metrics.tls_reloads
    return ServerTls(
        server.admin_tls_cert,
        server.admin_tls_key,
        on_reload=lambda ok: reloads.labels("ok" if ok else "failed").inc(),
    )


async def _serve_admin(
    admin: web.Application, config: Config, tls: ServerTls | None
) -> web.AppRunner:
    """Listen on server.admin_listen. Raises OSError if it cannot be bound."""
    listen = config.server.admin_listen
    assert listen is not None  # noqa: S101 - admin is only built with it
    runner = web.AppRunner(
        admin,
        handle_signals=False,
        access_log=None,  # scrapes every few seconds would drown the log
        keepalive_timeout=config.server.header_timeout,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        listen.host,
        listen.port,
        ssl_context=tls.context if tls is not None else None,
        backlog=64,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"server.admin_listen {listen}", exc) from exc
    log.info("serving /metrics, /healthz and /readyz on %s", listen)
    return runner


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("admin listener has no address")


def _restore(
    loop: asyncio.AbstractEventLoop,
    signals: list[signal.Signals],
    handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
) -> None:
    """Undo what serve() did to the loop: its signal and exception handlers."""
    for signum in signals:
        loop.remove_signal_handler(signum)
    loop.set_exception_handler(handler)
