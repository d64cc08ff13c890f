"""OCI error envelope: codes, the exception table and the middleware.

Every error a client sees is `{"errors": [{"code", "message", "detail"}]}`
with `Content-Type: application/json`. Domain exceptions are mapped to a code
here, and only here; anything unmapped is logged with its traceback and
becomes UNKNOWN (500) without leaking the traceback to the client.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from enum import Enum

from aiohttp import web

from mirror import errors

log = logging.getLogger(__name__)

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


class ErrorCode(Enum):
    """OCI distribution-spec error codes with their HTTP status."""

    BLOB_UNKNOWN = ("BLOB_UNKNOWN", 404)
    MANIFEST_UNKNOWN = ("MANIFEST_UNKNOWN", 404)
    NAME_UNKNOWN = ("NAME_UNKNOWN", 404)
    NOT_FOUND = ("NOT_FOUND", 404)
    NAME_INVALID = ("NAME_INVALID", 400)
    TAG_INVALID = ("TAG_INVALID", 400)
    DIGEST_INVALID = ("DIGEST_INVALID", 400)
    RANGE_INVALID = ("RANGE_INVALID", 416)
    BAD_REQUEST = ("BAD_REQUEST", 400)  # malformed HTTP, before any route
    UNAUTHORIZED = ("UNAUTHORIZED", 401)
    DENIED = ("DENIED", 403)
    UNSUPPORTED = ("UNSUPPORTED", 405)
    TOOMANYREQUESTS = ("TOOMANYREQUESTS", 429)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    UNKNOWN = ("UNKNOWN", 500)

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


# Most specific first: the first matching class wins.
EXCEPTION_CODES: tuple[tuple[type[errors.MirrorError], ErrorCode], ...] = (
    (errors.BlobUnknown, ErrorCode.BLOB_UNKNOWN),
    (errors.ManifestUnknown, ErrorCode.MANIFEST_UNKNOWN),
    (errors.NameUnknown, ErrorCode.NAME_UNKNOWN),
    (errors.ReferrersUnknown, ErrorCode.NOT_FOUND),
    (errors.NameInvalid, ErrorCode.NAME_INVALID),
    (errors.TagInvalid, ErrorCode.TAG_INVALID),
    (errors.DigestInvalid, ErrorCode.DIGEST_INVALID),
    (errors.RangeNotSatisfiable, ErrorCode.RANGE_INVALID),
    (errors.Unsupported, ErrorCode.UNSUPPORTED),
    (errors.RepositoryDenied, ErrorCode.DENIED),
    (errors.Overloaded, ErrorCode.UNAVAILABLE),
    (errors.UpstreamRateLimited, ErrorCode.TOOMANYREQUESTS),
    (errors.UpstreamDenied, ErrorCode.DENIED),
    (errors.UpstreamError, ErrorCode.UNAVAILABLE),
    (errors.DigestMismatch, ErrorCode.UNAVAILABLE),
)


def code_for(exc: errors.MirrorError) -> ErrorCode:
    for cls, code in EXCEPTION_CODES:
        if isinstance(exc, cls):
            return code
    return ErrorCode.UNKNOWN


def error_response(
    code: ErrorCode,
    message: str,
    detail: object = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> web.Response:
    """The OCI envelope for `code`, with its status unless `status` is given."""
    body = {"errors": [{"code": code.code, "message": message, "detail": detail}]}
    return web.Response(
        status=status or code.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={**API_VERSION_HEADER, **(headers or {})},
    )


def _response_for(exc: errors.MirrorError) -> web.Response:
    code = code_for(exc)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float) and math.isfinite(retry_after):
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
    if isinstance(exc, errors.RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.size}"
    if isinstance(exc, errors.Overloaded):
        headers["Retry-After"] = "1"
    return error_response(code, exc.message, exc.detail, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Render every failure as an OCI error envelope."""
    try:
        return await handler(request)
    except errors.MirrorError as exc:
        return _response_for(exc)
    except web.HTTPMethodNotAllowed:
        return error_response(
            ErrorCode.UNSUPPORTED,
            "this mirror is read-only: the operation is unsupported",
            {"method": request.method},
        )
    except web.HTTPNotFound:
        return error_response(
            ErrorCode.NOT_FOUND, "no such endpoint", {"path": request.path}
        )
    except web.HTTPException as exc:
        log.info("%s %s: %s", request.method, request.path, exc.reason)
        return error_response(ErrorCode.UNKNOWN, exc.reason, status=exc.status)
    except Exception:
        log.exception("unhandled error answering %s %s", request.method, request.path)
        return error_response(ErrorCode.UNKNOWN, "internal error")
