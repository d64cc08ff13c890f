"""Client authentication: HTTP Basic against an htpasswd file of bcrypt hashes.

With `auth.htpasswd` set, every `/v2/` request must carry the credentials of
a user in the file (the format distribution and nginx read, written by
`htpasswd -B`), or it gets `401 UNAUTHORIZED` with `WWW-Authenticate: Basic
realm="mirror"`, the answer `docker login`, containerd, podman and skopeo
expect from a registry.

A cached pull stays fast:

* bcrypt runs in a thread, never on the event loop, and at most a few at
  once (`_BCRYPT_AT_ONCE`), so a flood of logins cannot take every thread;
* a verified credential is remembered for `_VERIFIED_FOR` seconds after its
  last use, keyed by a keyed BLAKE2 hash of its Authorization header (a key
  made at start), never by the password itself; requests with one
  credential at once share one bcrypt check;
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
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiohttp import web

from mirror.api.clients import CLIENT
from mirror.api.errors import ErrorCode, Handler, error_response
from mirror.api.routes import Middleware
from mirror.htpasswd import HtpasswdError, read_htpasswd
from mirror.metrics import Metrics
from mirror.singleflight import SingleFlight
from mirror.tls import FileStamp, file_stamp

log = logging.getLogger(__name__)

REALM = "mirror"
_CHECK_EVERY = 2.0
_VERIFIED_FOR = 60.0
_VERIFIED_MAX = 4096
_BCRYPT_AT_ONCE = 4
_MAX_FAILURES = 10
_FAILURE_WINDOW = 60.0
_ADDRESSES_MAX = 65536


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
        self._clock = clock
        self._users: dict[str, bytes] = {}
        self._stamp: FileStamp | None = None
        self._loaded = False
        self._checked = 0.0
        self._key = secrets.token_bytes(32)
        # Keyed hash of an Authorization header -> when it stops being
        # trusted without bcrypt. Renewed by use; emptied when the file
        # changes, so a removed user or a changed password takes effect.
        self._verified: dict[bytes, float] = {}
        self._verifying: SingleFlight[bytes, bool] = SingleFlight()
        self._failures: dict[str, _Failures] = {}
        self._bcrypt = asyncio.Semaphore(_BCRYPT_AT_ONCE)
        # Looked up once: this runs on every request.
        results = ("verified", "cached", "missing", "rejected", "throttled")
        self._counted = {r: metrics.client_auth.labels(r) for r in results}

    def _refresh(self, now: float) -> None:
        """Read the file again if it changed; a file that no longer loads is
        logged and the users read before stay."""
        if self._loaded and now - self._checked < _CHECK_EVERY:
            return
        self._checked = now
        stamp = file_stamp(self._path)
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
        now = self._clock()
        self._refresh(now)
        address = ""
        if self._failures:
            address = request.get(CLIENT) or request.remote or ""
            failures = self._failures.get(address)
            if failures is not None and now - failures.since >= _FAILURE_WINDOW:
                del self._failures[address]
            elif failures is not None and failures.count >= _MAX_FAILURES:
                self._counted["throttled"].inc()
                wait = int(failures.since + _FAILURE_WINDOW - now) + 1
                return error_response(
                    ErrorCode.TOOMANYREQUESTS,
                    "too many failed logins from this address; try again later",
                    headers={"Retry-After": str(max(1, wait))},
                )
        header = request.headers.get("Authorization")
        if header is None:
            self._counted["missing"].inc()
            return _challenge("authentication required")
        key = hashlib.blake2b(header.encode(), key=self._key, digest_size=16).digest()
        if self._verified.get(key, 0.0) > now:
            self._verified[key] = now + _VERIFIED_FOR
            self._counted["cached"].inc()
            return None
        credentials = _basic(header)
        if credentials is None:
            self._counted["missing"].inc()
            return _challenge("authentication required")
        user, password = credentials
        # Requests with one credential at once share one bcrypt check; the
        # others count as cached, so `verified` counts bcrypt checks.
        joined = self._verifying.in_flight(key)
        if await self._verifying.do(key, lambda: self._verify(user, password)):
            self._remember(key, now)
            self._counted["cached" if joined else "verified"].inc()
            return None
        self._counted["rejected"].inc()
        address = address or request.get(CLIENT) or request.remote or ""
        self._failed(address, now)
        log.info("refused credentials of user %r from %s", user[:64], address)
        return _challenge("invalid username or password")

    def _remember(self, key: bytes, now: float) -> None:
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
        self._verified[key] = now + _VERIFIED_FOR

    def _failed(self, address: str, now: float) -> None:
        previous = self._failures.get(address)
        if previous is not None and now - previous.since < _FAILURE_WINDOW:
            self._failures[address] = _Failures(previous.count + 1, previous.since)
            return
        if len(self._failures) >= _ADDRESSES_MAX:
            self._failures = {
                a: f
                for a, f in self._failures.items()
                if now - f.since < _FAILURE_WINDOW
            }
            if len(self._failures) >= _ADDRESSES_MAX:
                self._failures.clear()
        self._failures[address] = _Failures(1, now)

    async def _verify(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        if hashed is None:
            return False
        async with self._bcrypt:
            return await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)


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
