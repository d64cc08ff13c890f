"""Upstream authentication: the registry token flow (Bearer) and Basic.

A registry answers an unauthenticated request with 401 and a challenge::

    WWW-Authenticate: Bearer realm="https://auth.docker.io/token",
        service="registry.docker.io",scope="repository:library/alpine:pull"

`TokenAuth` fetches `realm?service=...&scope=...` (anonymously for now),
caches the token per (realm, service, scope) until shortly before it expires,
and makes concurrent requests for one scope share one token fetch. It
remembers the last challenge, so later requests for other scopes authenticate
up front instead of paying a 401 round trip each.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from cachetools import TLRUCache

from mirror.errors import UpstreamDenied, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.singleflight import SingleFlight

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 60.0  # what the token spec says to assume without expires_in
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower case
    realm: str
    service: str
    error: str | None = None


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
        scheme, params.get("realm", ""), params.get("service", ""), params.get("error")
    )


def token_expiry_margin(ttl: float) -> float:
    """Drop a token this much before it expires: 10% of its life, 1-30 s."""
    return min(30.0, max(1.0, ttl * 0.1))


class TokenAuth:
    """Bearer tokens for one upstream registry."""

    def __init__(
        self,
        session_getter: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session_getter
        self._metrics = metrics
        self._clock = clock
        self._tokens: TLRUCache[tuple[str, str, str], _Token] = TLRUCache(
            maxsize=4096, ttu=lambda _k, tok, _now: tok.expires_at, timer=clock
        )
        self._fetches: SingleFlight[tuple[str, str, str], _Token] = SingleFlight()
        self._challenge: Challenge | None = None

    def header_for(self, scope: str) -> str | None:
        """The Authorization header to send up front for `scope`, if known."""
        challenge = self._challenge
        if challenge is None or challenge.scheme != "bearer":
            return None
        token = self._tokens.get((challenge.realm, challenge.service, scope))
        return token.header if token else None

    async def authenticate(self, www_authenticate: str, scope: str) -> str:
        """Answer a 401 challenge: the Authorization header to retry with.

        Raises UpstreamDenied if the challenge cannot be answered, and
        UpstreamUnavailable if the token service cannot be reached.
        """
        challenge = parse_challenge(www_authenticate)
        if challenge is None or challenge.scheme != "bearer" or not challenge.realm:
            raise UpstreamDenied(
                "upstream asks for authentication this mirror cannot give",
                {"challenge": www_authenticate},
            )
        self._challenge = challenge
        key = (challenge.realm, challenge.service, scope)
        if challenge.error != "invalid_token":
            cached = self._tokens.get(key)
            if cached is not None:
                return cached.header
        else:
            self._tokens.pop(key, None)
        token = await self._fetches.do(key, lambda: self._fetch(challenge, scope))
        return token.header

    async def _fetch(self, challenge: Challenge, scope: str) -> _Token:
        params = {"scope": scope}
        if challenge.service:
            params["service"] = challenge.service
        try:
            async with self._session().get(challenge.realm, params=params) as resp:
                self._metrics.upstream_requests.labels("token", str(resp.status)).inc()
                if resp.status in (401, 403):
                    raise UpstreamDenied(
                        "upstream token service refused the request",
                        {"status": resp.status},
                    )
                if resp.status != 200:
                    raise UpstreamUnavailable(
                        "upstream token service failed", {"status": resp.status}
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._metrics.upstream_requests.labels("token", "error").inc()
            raise UpstreamUnavailable(
                "upstream token service unreachable", {"error": str(exc)}
            ) from exc
        raw = (
            body.get("access_token") or body.get("token")
            if isinstance(body, dict)
            else None
        )
        if not isinstance(raw, str) or not raw:
            raise UpstreamUnavailable("upstream token service sent no token")
        ttl = body.get("expires_in")
        ttl = (
            float(ttl)
            if isinstance(ttl, int | float) and ttl > 0
            else DEFAULT_TOKEN_TTL
        )
        expires_at = self._clock() + ttl - token_expiry_margin(ttl)
        token = _Token(f"Bearer {raw}", expires_at)
        self._tokens[(challenge.realm, challenge.service, scope)] = token
        log.debug("got upstream token for %s (ttl %.0fs)", scope, ttl)
        return token
