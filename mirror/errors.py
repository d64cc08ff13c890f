"""Domain exceptions. Nothing here knows about HTTP.

The tree::

    MirrorError
    +-- NotFound                 the thing does not exist (here or upstream)
    |   +-- BlobUnknown
    |   +-- ManifestUnknown
    |   +-- NameUnknown          repository unknown, or a registry not mirrored
    |   +-- ReferrersUnknown     upstream has no referrers API (or list) for it
    +-- InvalidReference         a name, tag or digest breaks the grammar
    |   +-- NameInvalid
    |   +-- TagInvalid
    |   +-- DigestInvalid
    +-- RangeNotSatisfiable      a Range header outside the blob
    +-- Unsupported              a write, or a registry this mirror does not serve
    +-- RepositoryDenied         the mirror's allow/deny rules refuse the repository
    +-- Overloaded               out of a local resource (file descriptors)
    +-- UpstreamError            upstream could not give us what we asked for
    |   +-- UpstreamUnavailable  refused, reset, timed out, 5xx, cut mid-body
    |   |   +-- UpstreamDown     not asked: upstream failed moments ago
    |   +-- UpstreamRateLimited  429 from upstream
    |   +-- UpstreamDenied       401/403 after authenticating
    |   +-- ManifestTooLarge     upstream sent a manifest over the size limit
    +-- DigestMismatch           bytes did not hash to the digest they claim

`api/errors.py` maps each class to an OCI error code and HTTP status.
"""

from __future__ import annotations


class MirrorError(Exception):
    """Base of every error mirror raises on purpose.

    `message` is safe to show to clients; `detail` is optional structured
    context that ends up in the OCI error envelope.
    """

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(MirrorError):
    pass


class BlobUnknown(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__("blob unknown to registry", {"digest": digest})


class ManifestUnknown(NotFound):
    def __init__(self, name: str, reference: str) -> None:
        super().__init__("manifest unknown", {"name": name, "reference": reference})


class NameUnknown(NotFound):
    pass


class ReferrersUnknown(NotFound):
    def __init__(self, digest: str) -> None:
        super().__init__(
            "upstream has no referrers list for this digest; use the "
            "referrers tag schema (sha256-<hex>)",
            {"digest": digest},
        )


class InvalidReference(MirrorError):
    pass


class NameInvalid(InvalidReference):
    pass


class TagInvalid(InvalidReference):
    pass


class DigestInvalid(InvalidReference):
    pass


class RangeNotSatisfiable(MirrorError):
    def __init__(self, size: int) -> None:
        super().__init__("requested range not satisfiable", {"size": size})
        self.size = size


class Unsupported(MirrorError):
    pass


class Overloaded(MirrorError):
    pass


class RepositoryDenied(MirrorError):
    pass


class UpstreamError(MirrorError):
    pass


class ManifestTooLarge(UpstreamError):
    pass


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamDown(UpstreamUnavailable):
    pass


class UpstreamRateLimited(UpstreamError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamDenied(UpstreamError):
    pass


class DigestMismatch(MirrorError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            "content does not match its digest",
            {"expected": expected, "actual": actual},
        )
