"""Client authentication: HTTP Basic against an htpasswd file of bcrypt hashes.

With `auth.htpasswd` set, every `/v2/` request must carry the credentials of
a user in the file (the format distribution and nginx read, written by
`htpasswd -B`), or it gets `401 UNAUTHORIZED` with `WWW-Authenticate: Basic
realm="mirror"`, the answer `docker login`, containerd, podman and skopeo
expect from a registry.

A cached pull stays fast:

* bcrypt runs in a thread, never on the event loop, and at most a few at
  once (`_BCRYPT_AT_ONCE`), so a flood of logins cannot take every thread;
* a verified credential is remembered for `_VERIFIED_FOR` seconds, keyed by
  an HMAC of user and password under a key made at start, never by the
  password itself;
* the file is looked at (one stat) at most every `_CHECK_EVERY` seconds, and
  read again when it changed; the remembered credentials are then dropped.

Guessing is bounded: an address whose credentials were refused `_MAX_FAILURES`
times within `_FAILURE_WINDOW` seconds gets `429 TOOMANYREQUESTS` for the rest
of the window, without a bcrypt check, whatever it sends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiohttp import web
from cachetools import TTLCache

from mirror.api.clients import CLIENT
from mirror.api.errors import ErrorCode, Handler, error_response
from mirror.api.routes import Middleware
from mirror.htpasswd import HtpasswdError, read_htpasswd
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

REALM = "mirror"
_CHECK_EVERY = 2.0
_VERIFIED_FOR = 60.0
_VERIFIED_MAX = 4096
_BCRYPT_AT_ONCE = 4
_MAX_FAILURES = 10
_FAILURE_WINDOW = 60.0
_ADDRESSES_MAX = 65536


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class _Failures:
    count: int
    since: float


class ClientAuth:
    """The users of one htpasswd file, and what was recently verified.

    The file is read at the first request (config.load_config checked it
    loads), and again whenever it changes.
    """

    def __init__(
        self,
        path: Path,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._metrics = metrics
        self._clock = clock
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._checked = 0.0
        self._key = secrets.token_bytes(32)
        self._verified: TTLCache[bytes, bool] = TTLCache(
            maxsize=_VERIFIED_MAX, ttl=_VERIFIED_FOR, timer=clock
        )
        self._failures: TTLCache[str, _Failures] = TTLCache(
            maxsize=_ADDRESSES_MAX, ttl=_FAILURE_WINDOW, timer=clock
        )
        self._bcrypt = asyncio.Semaphore(_BCRYPT_AT_ONCE)

    def _refresh(self) -> None:
        """Read the file again if it changed; a file that no longer loads is
        logged and the users read before stay."""
        now = self._clock()
        if self._loaded and now - self._checked < _CHECK_EVERY:
            return
        self._checked = now
        stamp = _stamp(self._path)
        if self._loaded and stamp == self._stamp:
            return
        self._stamp, self._loaded = stamp, True
        try:
            self._users = read_htpasswd(self._path)
        except HtpasswdError as exc:
            log.error("htpasswd not reloaded, keeping its previous users: %s", exc)
            return
        self._verified.clear()
        log.info("htpasswd reloaded: %d users", len(self._users))

    async def check(self, request: web.Request) -> web.StreamResponse | None:
        """None if the request may go on, else the response to send."""
        self._refresh()
        address = request.get(CLIENT) or request.remote or ""
        failures = self._failures.get(address)
        if failures is not None and failures.count >= _MAX_FAILURES:
            self._count("throttled")
            wait = max(1, int(failures.since + _FAILURE_WINDOW - self._clock()) + 1)
            return error_response(
                ErrorCode.TOOMANYREQUESTS,
                "too many failed logins from this address; try again later",
                headers={"Retry-After": str(wait)},
            )
        credentials = _basic(request.headers.get("Authorization"))
        if credentials is None:
            self._count("missing")
            return _challenge("authentication required")
        user, password = credentials
        key = hmac.new(
            self._key, user.encode() + b"\0" + password.encode(), hashlib.sha256
        ).digest()
        if self._verified.get(key):
            self._count("cached")
            return None
        if await self._verify(user, password):
            self._verified[key] = True
            self._count("verified")
            return None
        self._count("rejected")
        now = self._clock()
        previous = self._failures.get(address)
        self._failures[address] = (
            _Failures(previous.count + 1, previous.since)
            if previous is not None
            else _Failures(1, now)
        )
        log.info("refused credentials of user %r from %s", user[:64], address)
        return _challenge("invalid username or password")

    async def _verify(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        if hashed is None:
            return False
        async with self._bcrypt:
            return await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)

    def _count(self, result: str) -> None:
        self._metrics.client_auth.labels(result).inc()


def _basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) of a Basic Authorization header, if it is one."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(encoded) > 4096:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user else None


def _challenge(message: str) -> web.Response:
    return error_response(
        ErrorCode.UNAUTHORIZED,
        message,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
    )


def auth_middleware(auth: ClientAuth) -> Middleware:
    """Require credentials on every `/v2` request (health and metrics stay
    open until they move to the admin listener)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v2"):
            refused = await auth.check(request)
            if refused is not None:
                return refused
        return await handler(request)

    return middleware
