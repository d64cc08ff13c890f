"""Unit tests for mirror.api.errors: the error table, envelope and middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror import errors
from mirror.api.errors import (
    EXCEPTION_CODES,
    ErrorCode,
    code_for,
    error_middleware,
    error_response,
)

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
DIGEST = "sha256:" + "a" * 64

# One instance of every concrete domain exception, with its expected code.
CASES: list[tuple[errors.MirrorError, str, int]] = [
    (errors.BlobUnknown(DIGEST), "BLOB_UNKNOWN", 404),
    (errors.ManifestUnknown("library/alpine", "latest"), "MANIFEST_UNKNOWN", 404),
    (errors.NameUnknown("repository name not known"), "NAME_UNKNOWN", 404),
    (errors.NameInvalid("invalid repository name"), "NAME_INVALID", 400),
    (errors.TagInvalid("invalid tag"), "TAG_INVALID", 400),
    (errors.DigestInvalid("invalid digest"), "DIGEST_INVALID", 400),
    (errors.RangeNotSatisfiable(10), "RANGE_INVALID", 416),
    (errors.Unsupported("read-only"), "UNSUPPORTED", 405),
    (errors.RepositoryDenied("not served"), "DENIED", 403),
    (errors.ReferrersUnknown(DIGEST), "NOT_FOUND", 404),
    (errors.Overloaded("out of file descriptors"), "UNAVAILABLE", 503),
    (errors.UpstreamRateLimited("slow down", 3.0), "TOOMANYREQUESTS", 429),
    (errors.UpstreamDenied("denied"), "DENIED", 403),
    (errors.UpstreamUnavailable("down"), "UNAVAILABLE", 503),
    (errors.UpstreamDown("failing fast"), "UNAVAILABLE", 503),
    (errors.ManifestTooLarge("too big"), "UNAVAILABLE", 503),
    (errors.UpstreamError("upstream failed"), "UNAVAILABLE", 503),
    (errors.DigestMismatch(DIGEST, "sha256:" + "b" * 64), "UNAVAILABLE", 503),
    # Unmapped: bases that are never raised on their own.
    (errors.MirrorError("base"), "UNKNOWN", 500),
    (errors.NotFound("vague"), "UNKNOWN", 500),
    (errors.InvalidReference("vague"), "UNKNOWN", 500),
]


@pytest.mark.parametrize(
    ("exc", "code", "status"), CASES, ids=[type(c[0]).__name__ for c in CASES]
)
def test_code_for(exc: errors.MirrorError, code: str, status: int) -> None:
    result = code_for(exc)
    assert result.code == code
    assert result.status == status


def test_every_table_entry_is_reachable() -> None:
    """No entry is shadowed by a more general class listed before it."""
    for index, (cls, _code) in enumerate(EXCEPTION_CODES):
        for earlier, _ in EXCEPTION_CODES[:index]:
            assert not issubclass(cls, earlier), f"{cls} shadowed by {earlier}"


def test_every_table_class_is_covered_by_cases() -> None:
    covered = {type(exc) for exc, _code, _status in CASES}
    assert {cls for cls, _ in EXCEPTION_CODES} <= covered


@pytest.mark.parametrize(
    ("member", "status"),
    [
        (ErrorCode.BLOB_UNKNOWN, 404),
        (ErrorCode.MANIFEST_UNKNOWN, 404),
        (ErrorCode.NAME_UNKNOWN, 404),
        (ErrorCode.NAME_INVALID, 400),
        (ErrorCode.DIGEST_INVALID, 400),
        (ErrorCode.TAG_INVALID, 400),
        (ErrorCode.UNAUTHORIZED, 401),
        (ErrorCode.DENIED, 403),
        (ErrorCode.UNSUPPORTED, 405),
        (ErrorCode.TOOMANYREQUESTS, 429),
        (ErrorCode.UNAVAILABLE, 503),
        (ErrorCode.UNKNOWN, 500),
    ],
)
def test_error_code_status(member: ErrorCode, status: int) -> None:
    assert member.status == status
    assert member.code == member.name


def test_error_response_envelope() -> None:
    response = error_response(
        ErrorCode.BLOB_UNKNOWN, "blob unknown to registry", {"digest": DIGEST}
    )
    assert response.status == 404
    assert response.content_type == "application/json"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert isinstance(response.body, bytes)
    assert json.loads(response.body) == {
        "errors": [
            {
                "code": "BLOB_UNKNOWN",
                "message": "blob unknown to registry",
                "detail": {"digest": DIGEST},
            }
        ]
    }


def test_error_response_null_detail_and_extra_headers() -> None:
    response = error_response(ErrorCode.UNKNOWN, "boom", headers={"X-A": "b"})
    assert response.status == 500
    assert response.headers["X-A"] == "b"
    assert isinstance(response.body, bytes)
    body = json.loads(response.body)
    assert body == {"errors": [{"code": "UNKNOWN", "message": "boom", "detail": None}]}


# --- middleware -------------------------------------------------------------------


def app_raising(exc: BaseException) -> web.Application:
    async def fail(request: web.Request) -> web.Response:
        raise exc

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/fail", fail)
    app.router.add_get("/ok", ok)
    return app


async def test_middleware_passes_success_through(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_raising(RuntimeError()))
    resp = await client.get("/ok")
    assert resp.status == 200
    assert await resp.text() == "fine"


@pytest.mark.parametrize(
    ("exc", "code", "status"), CASES, ids=[type(c[0]).__name__ for c in CASES]
)
async def test_middleware_renders_domain_errors(
    aiohttp_client: ClientFactory, exc: errors.MirrorError, code: str, status: int
) -> None:
    client = await aiohttp_client(app_raising(exc))
    resp = await client.get("/fail")
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await resp.json() == {
        "errors": [{"code": code, "message": exc.message, "detail": exc.detail}]
    }


@pytest.mark.parametrize(
    ("retry_after", "header"), [(3.0, "3"), (0.2, "1"), (1.5, "2")]
)
async def test_rate_limited_sets_retry_after(
    aiohttp_client: ClientFactory, retry_after: float, header: str
) -> None:
    client = await aiohttp_client(
        app_raising(errors.UpstreamRateLimited("slow down", retry_after))
    )
    resp = await client.get("/fail")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == header


async def test_rate_limited_without_retry_after(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_raising(errors.UpstreamRateLimited("slow")))
    resp = await client.get("/fail")
    assert resp.status == 429
    assert "Retry-After" not in resp.headers


async def test_range_not_satisfiable_sets_content_range(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(app_raising(errors.RangeNotSatisfiable(1234)))
    resp = await client.get("/fail")
    assert resp.status == 416
    assert resp.headers["Content-Range"] == "bytes */1234"


async def test_unexpected_exception_is_500_and_logged(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "internal-state-marker"
    client = await aiohttp_client(app_raising(RuntimeError(marker)))
    with caplog.at_level(logging.ERROR, logger="mirror.api.errors"):
        resp = await client.get("/fail")
    assert resp.status == 500
    assert resp.content_type == "application/json"
    text = await resp.text()
    assert marker not in text
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    body = json.loads(text)
    assert body["errors"][0]["code"] == "UNKNOWN"

    records = [r for r in caplog.records if r.name == "mirror.api.errors"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.ERROR
    assert "GET /fail" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert marker in caplog.text  # the traceback goes to the log, not the client


async def test_domain_errors_are_not_logged_as_exceptions(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(app_raising(errors.BlobUnknown(DIGEST)))
    with caplog.at_level(logging.ERROR, logger="mirror.api.errors"):
        resp = await client.get("/fail")
    assert resp.status == 404
    assert not [r for r in caplog.records if r.name == "mirror.api.errors"]


async def test_unknown_route_is_not_found(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_raising(RuntimeError()))
    resp = await client.get("/nowhere")
    assert resp.status == 404
    body = await resp.json()
    assert body["errors"][0]["code"] == "NOT_FOUND"
    assert body["errors"][0]["detail"] == {"path": "/nowhere"}


async def test_wrong_method_is_unsupported(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_raising(RuntimeError()))
    resp = await client.put("/ok", data=b"x")
    assert resp.status == 405
    body = await resp.json()
    assert body["errors"][0]["code"] == "UNSUPPORTED"
    assert body["errors"][0]["detail"] == {"method": "PUT"}


async def test_negative_retry_after_is_not_sent_negative(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(
        app_raising(errors.UpstreamRateLimited("slow down", -5.0))
    )
    resp = await client.get("/fail")
    assert resp.status == 429
    assert resp.headers.get("Retry-After", "0").isdigit()


@pytest.mark.parametrize("retry_after", [float("nan"), float("inf")])
async def test_non_finite_retry_after_still_renders_envelope(
    aiohttp_client: ClientFactory, retry_after: float
) -> None:
    client = await aiohttp_client(
        app_raising(errors.UpstreamRateLimited("slow down", retry_after))
    )
    resp = await client.get("/fail")
    assert resp.status == 429
    body = await resp.json()
    assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
