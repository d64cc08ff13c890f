"""Unit tests for mirror.upstream.auth: challenges, token TTLs and TokenAuth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.errors import UpstreamDenied, UpstreamUnavailable
from mirror.metrics import Metrics, RegistryMetrics
from mirror.upstream.auth import (
    DEFAULT_TOKEN_TTL,
    Challenge,
    TokenAuth,
    parse_challenge,
    token_expiry_margin,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
SCOPE = "repository:library/alpine:pull"
ORIGIN = "https://registry.test"

# --- parse_challenge --------------------------------------------------------------


def test_docker_hub_bearer_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",'
        'service="registry.docker.io",scope="repository:library/alpine:pull"'
    )
    assert parse_challenge(header) == Challenge(
        "bearer",
        "https://auth.docker.io/token",
        "registry.docker.io",
        scope="repository:library/alpine:pull",
    )


def test_bearer_with_unquoted_params() -> None:
    header = "Bearer realm=https://auth.example/token,service=registry.example"
    assert parse_challenge(header) == Challenge(
        "bearer", "https://auth.example/token", "registry.example"
    )


def test_bearer_with_spaces_and_mixed_case() -> None:
    header = 'BEARER  Realm = "https://a/token" , Service="svc"'
    assert parse_challenge(header) == Challenge("bearer", "https://a/token", "svc")


def test_bearer_invalid_token_error() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull",error="invalid_token"'
    )
    challenge = parse_challenge(header)
    assert challenge is not None
    assert challenge.error == "invalid_token"
    assert challenge.realm == "https://auth.docker.io/token"


def test_bearer_quoted_value_with_comma_and_equals() -> None:
    header = 'Bearer realm="https://a/token?x=1,y=2",service="s"'
    challenge = parse_challenge(header)
    assert challenge is not None
    assert challenge.realm == "https://a/token?x=1,y=2"
    assert challenge.service == "s"


def test_bearer_without_params() -> None:
    assert parse_challenge("Bearer") == Challenge("bearer", "", "")


def test_basic_challenge() -> None:
    assert parse_challenge('Basic realm="Registry Realm"') == Challenge(
        "basic", "Registry Realm", ""
    )


@pytest.mark.parametrize(
    "header", ["", "   ", 'Digest realm="x", nonce="y"', "Negotiate", "realm=x"]
)
def test_unknown_scheme_is_none(header: str) -> None:
    assert parse_challenge(header) is None


# --- token_expiry_margin ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "margin"),
    [
        (0.0, 1.0),
        (5.0, 1.0),
        (10.0, 1.0),
        (20.0, 2.0),
        (60.0, 6.0),
        (300.0, 30.0),
        (3600.0, 30.0),
    ],
)
def test_token_expiry_margin(ttl: float, margin: float) -> None:
    assert token_expiry_margin(ttl) == pytest.approx(margin)


def test_margin_is_always_less_than_a_realistic_ttl() -> None:
    for ttl in (2.0, 10.0, 60.0, 300.0, 86400.0):
        assert 1.0 <= token_expiry_margin(ttl) <= 30.0
        assert token_expiry_margin(ttl) < ttl


# --- TokenAuth against a tiny token service ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class TokenService:
    """Hands out numbered tokens; records each request's query."""

    status: int = 200
    body: Any = None
    expires_in: float | None = 300.0
    gate: asyncio.Event | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    scopes: list[list[str]] = field(default_factory=list)  # every scope asked
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.query))
        self.scopes.append(request.query.getall("scope", []))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.json_response({"details": "no"}, status=self.status)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        payload: dict[str, Any] = {"token": f"tok{len(self.requests)}"}
        if self.expires_in is not None:
            payload["expires_in"] = self.expires_in
        return web.json_response(payload)


@dataclass
class Harness:
    service: TokenService
    auth: TokenAuth
    clock: Clock
    metrics: Metrics
    realm: str

    def challenge(self, **extra: str) -> str:
        params = {"realm": self.realm, "service": "registry.test", **extra}
        return "Bearer " + ",".join(f'{k}="{v}"' for k, v in params.items())


@pytest.fixture
async def harness(aiohttp_server: ServerFactory) -> AsyncIterator[Harness]:
    service = TokenService()
    app = web.Application()
    app.router.add_get("/token", service.handle)
    server = await aiohttp_server(app)
    clock = Clock()
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:

        def get(
            url: str, params: list[tuple[str, str]], headers: dict[str, str]
        ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
            return session.get(
                url, params=params, headers=headers, allow_redirects=False
            )

        auth = TokenAuth(
            get,
            RegistryMetrics(metrics, "docker.io"),
            upstream_url=str(server.make_url("")),
            clock=clock,
        )
        yield Harness(service, auth, clock, metrics, str(server.make_url("/token")))


async def test_authenticate_fetches_and_caches(harness: Harness) -> None:
    auth = harness.auth
    assert auth.header_for(ORIGIN, SCOPE) is None  # no challenge seen yet

    header = await auth.authenticate(ORIGIN, harness.challenge(), SCOPE)

    assert header == "Bearer tok1"
    assert harness.service.requests == [{"scope": SCOPE, "service": "registry.test"}]
    assert auth.header_for(ORIGIN, SCOPE) == "Bearer tok1"
    assert auth.header_for(ORIGIN, "repository:library/busybox:pull") is None
    assert await auth.authenticate(ORIGIN, harness.challenge(), SCOPE) == "Bearer tok1"
    assert len(harness.service.requests) == 1
    value = harness.metrics.registry.get_sample_value(
        "mirror_upstream_requests_total",
        {"registry": "docker.io", "kind": "token", "result": "200"},
    )
    assert value == 1.0


async def test_service_param_omitted_when_challenge_has_none(harness: Harness) -> None:
    await harness.auth.authenticate(ORIGIN, f'Bearer realm="{harness.realm}"', SCOPE)
    assert harness.service.requests == [{"scope": SCOPE}]


async def test_invalid_token_forces_a_new_token(harness: Harness) -> None:
    auth = harness.auth
    assert await auth.authenticate(ORIGIN, harness.challenge(), SCOPE) == "Bearer tok1"
    retry = harness.challenge(error="invalid_token")
    assert await auth.authenticate(ORIGIN, retry, SCOPE) == "Bearer tok2"
    assert auth.header_for(ORIGIN, SCOPE) == "Bearer tok2"


async def test_token_expires_before_its_ttl(harness: Harness) -> None:
    harness.service.expires_in = 100.0  # margin 10 s: valid until now + 90
    auth = harness.auth
    assert await auth.authenticate(ORIGIN, harness.challenge(), SCOPE) == "Bearer tok1"
    harness.clock.now += 89.0
    assert auth.header_for(ORIGIN, SCOPE) == "Bearer tok1"
    harness.clock.now += 2.0
    assert auth.header_for(ORIGIN, SCOPE) is None
    assert await auth.authenticate(ORIGIN, harness.challenge(), SCOPE) == "Bearer tok2"


async def test_default_ttl_without_expires_in(harness: Harness) -> None:
    harness.service.expires_in = None
    auth = harness.auth
    await auth.authenticate(ORIGIN, harness.challenge(), SCOPE)
    lifetime = DEFAULT_TOKEN_TTL - token_expiry_margin(DEFAULT_TOKEN_TTL)
    harness.clock.now += lifetime - 1
    assert auth.header_for(ORIGIN, SCOPE) == "Bearer tok1"
    harness.clock.now += 2
    assert auth.header_for(ORIGIN, SCOPE) is None


async def test_concurrent_requests_share_one_fetch(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.service.gate = gate
    challenge = harness.challenge()
    calls = [
        asyncio.create_task(harness.auth.authenticate(ORIGIN, challenge, SCOPE))
        for _ in range(4)
    ]
    await harness.service.arrived.wait()
    gate.set()
    assert await asyncio.gather(*calls) == ["Bearer tok1"] * 4
    assert len(harness.service.requests) == 1


async def test_access_token_field_is_preferred(harness: Harness) -> None:
    harness.service.body = b'{"access_token": "at", "token": "t", "expires_in": 60}'
    assert (
        await harness.auth.authenticate(ORIGIN, harness.challenge(), SCOPE)
        == "Bearer at"
    )


@pytest.mark.parametrize("status", [401, 403])
async def test_token_service_refusal_is_denied(harness: Harness, status: int) -> None:
    harness.service.status = status
    with pytest.raises(UpstreamDenied):
        await harness.auth.authenticate(ORIGIN, harness.challenge(), SCOPE)


async def test_token_service_error_is_unavailable(harness: Harness) -> None:
    harness.service.status = 500
    with pytest.raises(UpstreamUnavailable) as info:
        await harness.auth.authenticate(ORIGIN, harness.challenge(), SCOPE)
    assert info.value.detail == {"status": 500}


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b"{}", b'{"token": ""}', b'{"token": 5}']
)
async def test_bad_token_body_is_unavailable(harness: Harness, body: bytes) -> None:
    harness.service.body = body
    with pytest.raises(UpstreamUnavailable):
        await harness.auth.authenticate(ORIGIN, harness.challenge(), SCOPE)
    assert harness.auth.header_for(ORIGIN, SCOPE) is None


async def test_unreachable_token_service_is_unavailable(harness: Harness) -> None:
    # Port 1 on localhost: connection refused, no waiting.
    challenge = 'Bearer realm="http://127.0.0.1:1/token",service="s"'
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        await harness.auth.authenticate(ORIGIN, challenge, SCOPE)
    value = harness.metrics.registry.get_sample_value(
        "mirror_upstream_requests_total",
        {"registry": "docker.io", "kind": "token", "result": "error"},
    )
    assert value == 1.0


@pytest.mark.parametrize(
    "header", ['Basic realm="Registry"', 'Bearer service="s"', "Negotiate", ""]
)
async def test_unanswerable_challenge_is_denied(harness: Harness, header: str) -> None:
    with pytest.raises(UpstreamDenied):
        await harness.auth.authenticate(ORIGIN, header, SCOPE)
    assert harness.service.requests == []


async def test_a_token_goes_only_to_the_origin_whose_challenge_it_answers(
    harness: Harness,
) -> None:
    """A registry that redirects to another (registry.k8s.io) must not send
    the other's token to itself, nor its own to the other."""
    auth = harness.auth
    await auth.authenticate(ORIGIN, harness.challenge(), SCOPE)
    assert auth.header_for(ORIGIN, SCOPE) == "Bearer tok1"
    assert auth.header_for("https://elsewhere.test", SCOPE) is None
    other = "https://regional.test"
    assert await auth.authenticate(other, harness.challenge(), SCOPE) == "Bearer tok1"
    assert auth.header_for(other, SCOPE) == "Bearer tok1"


async def test_the_scope_a_challenge_names_is_asked_for_too(harness: Harness) -> None:
    theirs = "repository:k8s-artifacts-prod/images/pause:pull"
    challenge = harness.challenge(scope=theirs)
    await harness.auth.authenticate(ORIGIN, challenge, SCOPE)
    assert harness.service.scopes == [[SCOPE, theirs]]
    # The same scope as ours is asked once.
    await harness.auth.authenticate(
        ORIGIN,
        harness.challenge(scope="repository:library/busybox:pull"),
        "repository:library/busybox:pull",
    )
    assert harness.service.scopes[-1] == ["repository:library/busybox:pull"]
