"""Upstream authentication: the registry token flow (Bearer) and Basic.

A registry answers an unauthenticated request with 401 and a challenge::

    WWW-Authenticate: Bearer realm="https://auth.docker.io/token",
        service="registry.docker.io",scope="repository:library/alpine:pull"

`TokenAuth` fetches `realm?service=...&scope=...` — anonymously, or with HTTP
Basic credentials when configured — caches the token per (realm, service,
scope) until shortly before it expires, and makes concurrent requests for one
scope share one token fetch. It remembers the last challenge, so later
requests for other scopes authenticate up front instead of paying a 401 each.

Credentials go only to a realm on the upstream's own domain (the last two
labels of its host name: `auth.docker.io` for `registry-1.docker.io`), or to
one listed in `upstream.trusted_realms`, and only over HTTPS (plain HTTP only
to loopback, for tests). A realm elsewhere is refused, not answered
anonymously: silently pulling as anonymous would hide that the configured
account is not being used. Rejected credentials are logged as errors,
counted, and make the mirror report itself not ready until a token fetch
succeeds again.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from cachetools import LRUCache, TLRUCache

from mirror.errors import UpstreamDenied, UpstreamUnavailable
from mirror.metrics import RegistryMetrics
from mirror.singleflight import SingleFlight
from mirror.upstream.body import read_bounded
from mirror.values import loads_json

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 60.0  # what the token spec says to assume without expires_in
# A token is trusted for at most a day, whatever expires_in says.
MAX_TOKEN_TTL = 86400.0
# Read at most this much of a token response unless told otherwise.
MAX_TOKEN_BODY = 1024 * 1024
# After upstream rejected the credentials, token fetches wait this long.
REJECTED_BACKOFF = 30.0
# Origins (a registry and those it redirects to) whose challenges are kept.
_ORIGINS = 64
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    realm: str
    service: str
    error: str | None = None
    scope: str | None = None  # what the registry says the token must grant


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class _Token:
    header: str
    expires_at: float


def parse_challenge(header: str) -> Challenge | None:
    """Parse a WWW-Authenticate header; None if it is not Bearer or Basic."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[0].lower(): m[1] or m[2] for m in _PARAM_RE.findall(rest)}
    scheme = scheme.lower()
    if scheme not in {"bearer", "basic"}:
        return None
    return Challenge(
        scheme,
        params.get("realm", ""),
        params.get("service", ""),
        params.get("error"),
        params.get("scope"),
    )


def token_expiry_margin(ttl: float) -> float:
    """Drop a token this much before it expires: 10% of its life, 1-30 s."""
    return min(30.0, max(1.0, ttl * 0.1))


def _registrable_domain(host: str) -> str:
    """`registry-1.docker.io` -> `docker.io`; IPs and single labels as is."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        labels = host.split(".")
        return ".".join(labels[-2:]) if len(labels) > 2 else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_realm(realm: str) -> bool:
    """Is the realm an http(s) URL with a host we could connect to?"""
    try:
        parts = urlsplit(realm)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and realm.isascii()
        and realm.isprintable()
    )


def realm_trusted(realm: str, upstream_url: str, trusted: tuple[str, ...]) -> bool:
    """May credentials be sent to this (valid) token realm?"""
    parts = urlsplit(realm)
    host = (parts.hostname or "").lower()
    if not host or (parts.scheme != "https" and not _is_loopback(host)):
        return False
    upstream_host = (urlsplit(upstream_url).hostname or "").lower()
    domain = _registrable_domain(upstream_host)
    return host == domain or host.endswith("." + domain) or host in trusted


# GET url with params and headers: the token request, as the registry's client
# sends it (its session, its TLS trust, no redirects).
TokenGet = Callable[
    [str, list[tuple[str, str]], dict[str, str]],
    AbstractAsyncContextManager[aiohttp.ClientResponse],
]


class TokenAuth:
    """Bearer tokens (and Basic answers) for one upstream registry."""

    def __init__(
        self,
        get: TokenGet,
        metrics: RegistryMetrics,
        *,
        upstream_url: str,
        credentials: Credentials | None = None,
        trusted_realms: tuple[str, ...] = (),
        max_body_size: int = MAX_TOKEN_BODY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._get = get
        self._max_body_size = max_body_size
        self._metrics = metrics
        self._upstream_url = upstream_url
        self._credentials = credentials
        self._trusted_realms = trusted_realms
        self._clock = clock
        self._tokens: TLRUCache[tuple[str, str, str], _Token] = TLRUCache(
            maxsize=4096, ttu=lambda _k, tok, _now: tok.expires_at, timer=clock
        )
        self._fetches: SingleFlight[tuple[str, str, str], _Token] = SingleFlight()
        # The last challenge of each origin (scheme://host:port): a registry
        # may redirect to another that authenticates on its own (as
        # registry.k8s.io does), and a token is only ever sent to the origin
        # whose challenge it answers.
        self._challenges: LRUCache[str, Challenge] = LRUCache(maxsize=_ORIGINS)
        # Set when upstream rejected our credentials; cleared by a success.
        self.credentials_rejected = False
        self._rejected_until = 0.0

    @property
    def identity(self) -> str:
        """`authenticated` or `anonymous`: never the account name, which
        has no place on /readyz or in logs."""
        return "authenticated" if self._credentials else "anonymous"

    def header_for(self, origin: str, scope: str) -> str | None:
        """The Authorization header to send up front to `origin` for `scope`,
        if known."""
        challenge = self._challenges.get(origin)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._credentials.basic() if self._credentials else None
        token = self._tokens.get((challenge.realm, challenge.service, scope))
        return token.header if token else None

    async def authenticate(self, origin: str, www_authenticate: str, scope: str) -> str:
        """Answer a 401 challenge: the Authorization header to retry with.

        Raises UpstreamDenied if the challenge cannot be answered (or our
        credentials were rejected), UpstreamUnavailable if the token service
        cannot be reached.
        """
        challenge = parse_challenge(www_authenticate)
        if challenge is None:
            raise UpstreamDenied(
                "upstream asks for authentication this mirror cannot give"
            )
        realm = challenge.realm
        if challenge.scheme == "bearer" and realm and not valid_realm(realm):
            self._metrics.invalid.labels("token_realm").inc()
            raise UpstreamUnavailable("upstream token realm is not a valid URL")
        self._challenges[origin] = challenge
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise UpstreamDenied("upstream wants credentials; none configured")
            return self._credentials.basic()
        if not challenge.realm:
            raise UpstreamDenied("upstream bearer challenge names no realm")
        if self._clock() < self._rejected_until:
            # Asking again with credentials just refused would only add a
            # log line per request (and may get the account locked).
            raise UpstreamDenied("upstream rejected the mirror's credentials")
        key = (challenge.realm, challenge.service, scope)
        if challenge.error == "invalid_token":
            self._tokens.pop(key, None)
        else:
            cached = self._tokens.get(key)
            if cached is not None:
                return cached.header
        token = await self._fetches.do(key, lambda: self._fetch(challenge, scope))
        return token.header

    async def _fetch(self, challenge: Challenge, scope: str) -> _Token:
        headers = {}
        if self._credentials is not None:
            if not realm_trusted(
                challenge.realm, self._upstream_url, self._trusted_realms
            ):
                log.error(
                    "refusing to send %s credentials to untrusted token realm %s "
                    "(add its host to trusted_realms if it is genuine)",
                    self._metrics.registry,
                    challenge.realm,
                )
                self._metrics.auth_failures.labels("untrusted_realm").inc()
                raise UpstreamDenied(
                    "upstream token realm is not trusted with credentials",
                    {"realm_host": urlsplit(challenge.realm).hostname},
                )
            headers["Authorization"] = self._credentials.basic()
        # The scope a request is for, and the one the challenge names if it
        # differs (a registry redirected to may name the repository its own
        # way), as containerd asks.
        params = [("scope", scope)]
        if challenge.scope and challenge.scope != scope:
            params.append(("scope", challenge.scope))
        if challenge.service:
            params.append(("service", challenge.service))
        try:
            async with self._get(challenge.realm, params, headers) as resp:
                self._metrics.requests.labels("token", str(resp.status)).inc()
                if resp.status in (401, 403):
                    self._rejected(resp.status)
                if resp.status != 200:
                    raise UpstreamUnavailable(
                        "upstream token service failed", {"status": resp.status}
                    )
                raw_body = await self._read_limited(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.requests.labels("token", "error").inc()
            raise UpstreamUnavailable(
                "upstream token service unreachable", {"error": type(exc).__name__}
            ) from exc
        try:
            body = loads_json(raw_body)
        except ValueError:
            self._metrics.invalid.labels("token").inc()
            raise UpstreamUnavailable("upstream token service sent no JSON") from None
        raw = None
        if isinstance(body, dict):
            raw = body.get("access_token") or body.get("token")
        if not isinstance(raw, str) or not raw or not _header_safe(raw):
            self._metrics.invalid.labels("token").inc()
            raise UpstreamUnavailable("upstream token service sent no token")
        ttl = _token_ttl(body.get("expires_in"))
        expires_at = self._clock() + ttl - token_expiry_margin(ttl)
        token = _Token(f"Bearer {raw}", expires_at)
        self._tokens[(challenge.realm, challenge.service, scope)] = token
        if self.credentials_rejected:
            log.info(
                "%s accepts the configured credentials again", self._metrics.registry
            )
        self.credentials_rejected = False
        log.debug("got upstream token for %s (ttl %.0fs)", scope, ttl)
        return token

    def _rejected(self, status: int) -> None:
        """The token service said no. Raises UpstreamDenied."""
        if self._credentials is not None:
            self.credentials_rejected = True
            self._rejected_until = self._clock() + REJECTED_BACKOFF
            self._metrics.auth_failures.labels("rejected").inc()
            log.error(
                "%s rejected the configured credentials (HTTP %d); check its "
                "username and password",
                self._metrics.registry,
                status,
            )
            raise UpstreamDenied(
                "upstream rejected the mirror's credentials", {"status": status}
            )
        self._metrics.auth_failures.labels("denied").inc()
        raise UpstreamDenied("upstream token service refused the request")

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> bytes:
        """The token body, refused past max_body_size. Raises
        UpstreamUnavailable."""
        limit = self._max_body_size
        body = await read_bounded(resp, limit)
        if body is None:
            self._metrics.invalid.labels("too_large").inc()
            raise UpstreamUnavailable(f"upstream token response exceeds {limit} bytes")
        return body


def _token_ttl(value: object) -> float:
    """expires_in as seconds: finite, positive, at most a day."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DEFAULT_TOKEN_TTL
    try:
        ttl = float(value)
    except OverflowError:  # an int of hundreds of digits
        return MAX_TOKEN_TTL
    if ttl != ttl or ttl <= 0:  # NaN, or not positive
        return DEFAULT_TOKEN_TTL
    return min(ttl, MAX_TOKEN_TTL)


def _header_safe(token: str) -> bool:
    """A token goes into an Authorization header: printable ASCII only."""
    return len(token) <= 65536 and token.isascii() and token.isprintable()
