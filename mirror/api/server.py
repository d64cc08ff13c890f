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
* **A TLS handshake on the plain-HTTP port** (podman and skopeo try
  https:// first when TLS verification is off) is answered with a plain 400
  and closed before aiohttp's parser sees it: no access line, a counter, and
  an INFO line a minute at most.
* **An access log that says what happened**: one line per request with the
  body bytes really sent (sendfile's included), the cache result, the
  upstream registry and the request id (also sent as `X-Request-Id`); the
  request line and User-Agent are escaped and cut short, so a client cannot
  forge log lines. With `log.format = "json"` the same fields are keys of a
  JSON object (mirror/logformat.py, docs/logging.md).
* **"listening" only once it is true**: logged after the app started
  (reconciliation done) and every socket is bound.
* **HTTPS** when `server.tls_cert` and `server.tls_key` are set, reloaded
  on SIGHUP and when the files change (see mirror/tls.py); a TLS handshake
  must finish within `server.header_timeout` too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from mirror import __version__
from mirror.api.clients import CLIENT
from mirror.api.errors import API_VERSION_HEADER, ErrorCode, error_response
from mirror.api.routes import BODY_BYTES, OUTCOME
from mirror.api.routing import ROUTE
from mirror.config import Address, Config, small_blob_slots
from mirror.logutil import OncePer, escape
from mirror.metrics import Metrics
from mirror.tls import ServerTls

log = logging.getLogger(__name__)
access_log = logging.getLogger("mirror.access")

# The access line of log.format = "text" (AccessLogger).
ACCESS_TEXT = '%s "%s" %d %d %.6fs cache=%s registry=%s id=%s "%s"'
# Longest path written into a JSON access line (the text line cuts the
# whole request line at 512 characters).
_JSON_PATH_LIMIT = 2048

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


def _canned(status: str, code: ErrorCode, message: str, extra: dict[str, str]) -> bytes:
    """A whole HTTP/1.1 response with an OCI error body, for answers written
    straight to the transport."""
    body = json.dumps(
        {"errors": [{"code": code.code, "message": message, "detail": None}]}
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **extra,
        **API_VERSION_HEADER,
        "Connection": "close",
    }
    head = f"HTTP/1.1 {status}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return (head + "\r\n").encode() + body


_REFUSAL = _canned(
    "503 Service Unavailable",
    ErrorCode.UNAVAILABLE,
    "mirror is at its connection limit; retry shortly",
    {"Retry-After": "1"},
)
# What a TLS client gets on the plain-HTTP port. A TLS library reads it as a
# broken handshake; Go's (podman, skopeo, containerd) names it "server gave
# HTTP response to HTTPS client", which is the truth.
_PLAIN_HTTP_ONLY = _canned(
    "400 Bad Request",
    ErrorCode.BAD_REQUEST,
    "this port serves plain HTTP: use http://, not https://",
    {},
)
# A TLS record of type handshake (a ClientHello) starts with this byte; no
# HTTP request does (a method is a token of printable characters).
_TLS_HANDSHAKE = 0x16


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


class BadRequests:
    """What the listener does about connections that send no valid HTTP:
    count them, and log them at most once a minute per kind."""

    def __init__(self, metrics: Metrics, *, plain: bool) -> None:
        self.plain = plain  # the listener speaks HTTP without TLS
        self._metrics = metrics
        self._malformed = OncePer(60.0)
        self._tls = OncePer(60.0)

    def malformed(self) -> bool:
        """Count a malformed request; true if it may be logged now."""
        self._metrics.http_bad_requests.labels("malformed").inc()
        return self._malformed.ready()

    def tls_on_plain(self, transport: asyncio.BaseTransport) -> None:
        self._metrics.http_bad_requests.labels("tls_on_plain").inc()
        if self._tls.ready():
            peer = transport.get_extra_info("peername")
            log.info(
                "TLS handshake on the plain-HTTP port from %s; clients must use "
                "http:// (podman, skopeo and buildah try https:// first when TLS "
                "verification is off; this is repeated at most once a minute)",
                peer[0] if isinstance(peer, tuple) else "an unknown address",
            )


class _Handler(RequestHandler):
    """aiohttp's connection handler, with the limit and OCI error pages."""

    def __init__(
        self, limit: ConnectionLimit, bad_requests: BadRequests, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._limit = limit
        self._bad_requests = bad_requests
        self._refused: asyncio.Transport | None = None
        self._waiting = False  # a refusal counted in ConnectionLimit.refusing
        self._admitted = False
        self._first = True  # no bytes received yet

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
        if self._first:
            self._first = False
            if data and data[0] == _TLS_HANDSHAKE and self._bad_requests.plain:
                self._tls_on_plain()
                return
        super().data_received(data)

    def _tls_on_plain(self) -> None:
        """A ClientHello where an HTTP request belongs: answer in plain HTTP
        and close, without aiohttp's parser (whose 400 would be logged as an
        `UNKNOWN /` request)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._bad_requests.tls_on_plain(transport)
        transport.write(_PLAIN_HTTP_ONLY)
        transport.close()

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
            if self._bad_requests.malformed():
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
    """One line per request (ACCESS_TEXT; with `log.format = "json"`, the
    fields of mirror.logformat.ACCESS_FIELDS as the record's `access`):

    `remote "METHOD path HTTP/x.y" status bytes seconds cache=... registry=...
    id=... "User-Agent"`, with the client-chosen parts escaped. `bytes` is
    the body sent: aiohttp's writer's body bytes (not the headers) plus
    sendfile's (Outcome.sent), so a cached blob logs its full size.
    """

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._json = log_format == "json"

    def log(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float
    ) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        done = request.get(OUTCOME)
        body = request.get(BODY_BYTES)
        if done is None or body is None:
            # aiohttp's own answer (a malformed request): written in one go.
            sent = response.content_length or 0
            cache = registry = request_id = None
        else:
            sent = body.count + done.sent
            cache, request_id = done.cache, done.id
            route = request.get(ROUTE)
            registry = route.registry.name if route is not None else done.registry
        # The client behind a trusted proxy, when there is one.
        remote = request.get(CLIENT) or request.remote or "-"
        version = request.version
        agent = request.headers.get("User-Agent")
        if self._json:
            path = request.path_qs[:_JSON_PATH_LIMIT]
            self.logger.info(
                "%s %s %d",
                request.method,
                path,
                response.status,
                extra={
                    "access": {
                        "remote": remote,
                        "method": request.method,
                        "path": path,
                        "proto": f"HTTP/{version.major}.{version.minor}",
                        "status": response.status,
                        "bytes": sent,
                        "duration_s": round(time, 6),
                        "cache": cache,
                        "registry": registry,
                        "request_id": request_id,
                        "user_agent": None if agent is None else agent[:512],
                    }
                },
            )
            return
        line = (
            f"{request.method} {request.path_qs} HTTP/{version.major}.{version.minor}"
        )
        self.logger.info(
            ACCESS_TEXT,
            remote,
            escape(line, 512),
            response.status,
            sent,
            time,
            cache or "-",
            registry or "-",
            request_id or "-",
            "-" if agent is None else escape(agent, 256),
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
        "access_log_format": config.log.format,
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
    bad_requests = BadRequests(metrics, plain=tls is None)

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
        port = server.sockets[0].getsockname()[1]
        # Only now: the app has started (runner.setup() ran the start-up,
        # reconciliation included) and every socket is bound.
        log.info(
            "mirror %s listening on %s (%s)",
            __version__,
            Address(listen.host, port),
            "https" if tls is not None else "http",
        )
        if admin_runner is not None and admin_started is not None:
            admin_started(_bound_port(admin_runner))
        if started is not None:
            started(port)
        await stop.wait()
        log.info("shutting down")
    finally:
        for watcher in watchers:
            watcher.cancel()
        server.close()  # no new connections; runner.cleanup ends the open ones
        # Side by side, so the admin listener adds nothing to the drain.
        cleanups = [runner.cleanup()]
        if admin_runner is not None:
            cleanups.append(admin_runner.cleanup())
        failed = [
            e for e in await asyncio.gather(*cleanups, return_exceptions=True) if e
        ]
        await server.wait_closed()
        _restore(loop, signals, previous_handler)
        if failed:
            raise failed[0]


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
        # asyncio's create_server words its own strerror ("error while
        # attempting to bind on address (...): address already in use").
        reason = os.strerror(cause.errno) if cause.errno else cause.strerror
        super().__init__(cause.errno, f"cannot listen on {what}: {reason}")


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
        shutdown_timeout=SHUTDOWN_TIMEOUT,
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
    log.info(
        "serving /metrics, /healthz, /readyz and the status page on %s (%s)",
        Address(listen.host, _bound_port(runner)),
        "https" if tls is not None else "http",
    )
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
