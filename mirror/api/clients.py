"""Who the client is, whether it may use the mirror, and how much at once.

The first middleware of the app:

* **The client's address** is the connection's peer, or, when the peer is a
  trusted proxy (`server.trusted_proxies`), taken from `X-Forwarded-For`:
  the right-most address that is not itself a trusted proxy. Addresses
  further left were written by the client and prove nothing. The result is
  kept on the request (CLIENT) for the other middlewares (login throttling)
  and the log.
* **`server.allow_from`**: any other address gets `403 DENIED` before any
  work is done. `/healthz` stays open (a liveness probe comes from the
  node, and the answer tells nothing).
* **`server.max_requests_per_client`**: requests of one address in flight
  at once, past which it gets `429 TOOMANYREQUESTS` with `Retry-After: 1`,
  so one runaway job cannot take every connection and download slot.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from aiohttp import web

from mirror.api.errors import ErrorCode, Handler, error_response
from mirror.api.routes import Middleware
from mirror.config import ServerConfig
from mirror.metrics import Metrics

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

CLIENT = web.RequestKey("client", str)
# Always answered, whoever asks.
_OPEN_PATHS = frozenset({"/healthz"})


def _parse(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


class ClientPolicy:
    """The address rules of `[server]`; see the module docstring."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        allow_from: tuple[Network, ...] = (),
        trusted_proxies: tuple[Network, ...] = (),
        max_in_flight: int = 0,
    ) -> None:
        self._allow = allow_from
        self._proxies = trusted_proxies
        self._limit = max_in_flight
        self._metrics = metrics
        self._in_flight: Counter[str] = Counter()

    @classmethod
    def of(cls, config: ServerConfig, metrics: Metrics) -> ClientPolicy | None:
        """The registry port's policy; None when it has no rule to apply."""
        if not (
            config.allow_from
            or config.trusted_proxies
            or config.max_requests_per_client
        ):
            return None
        return cls(
            metrics,
            allow_from=config.allow_from,
            trusted_proxies=config.trusted_proxies,
            max_in_flight=config.max_requests_per_client,
        )

    def address(self, request: web.Request) -> Address | None:
        """The client's address (None if it cannot be told)."""
        peer = _parse(request.remote or "")
        if peer is None or not self._proxies or not _within(peer, self._proxies):
            return peer
        hops = [
            hop
            for header in request.headers.getall("X-Forwarded-For", [])
            for hop in header.split(",")
        ]
        for hop in reversed(hops):
            address = _parse(hop)
            if address is None:
                return None  # garbage where an address should be: no client
            if not _within(address, self._proxies):
                return address
        return peer

    async def handle(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        address = self.address(request)
        name = str(address) if address is not None else "unknown"
        request[CLIENT] = name
        if self._allow and (address is None or not _within(address, self._allow)):
            self._metrics.client_refusals.labels("address").inc()
            return error_response(
                ErrorCode.DENIED,
                "this address may not use the mirror",
                {"address": name},
            )
        if self._limit and self._in_flight[name] >= self._limit:
            self._metrics.client_refusals.labels("busy").inc()
            return error_response(
                ErrorCode.TOOMANYREQUESTS,
                "too many requests from this address at once",
                {"limit": self._limit},
                headers={"Retry-After": "1"},
            )
        self._in_flight[name] += 1
        try:
            return await handler(request)
        finally:
            self._in_flight[name] -= 1
            if not self._in_flight[name]:
                del self._in_flight[name]


def client_middleware(policy: ClientPolicy) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await policy.handle(request, handler)

    return middleware
