"""Assertions about what the upstream registry served, with readable failures.

This module owns the two questions most integration tests end with: "did the
first pull fetch each needed blob from upstream exactly once (and nothing
else)?" and "did the repeat pull fetch nothing immutable from upstream?".
Failure messages list every request the registry logged, which is usually
enough to see what the mirror did wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from .upstream import RequestLog


def fetched_once(log: RequestLog, digests: Iterable[str], *, context: str) -> None:
    """Assert upstream served one GET per blob in ``digests`` and no others.

    Exactly once: a second GET of the same blob means the mirror did not
    deduplicate concurrent fetches or did not cache; a GET of a blob not in
    ``digests`` means it fetched content nobody asked for. Only successful
    GETs count: a 401 before the mirror fetched a token moved no content.
    """
    expected = dict.fromkeys(digests, 1)
    got = dict(log.blob_gets(successful=True))
    assert got == expected, (
        f"{context}: upstream blob GETs differ from one per needed blob\n"
        f"missing: {sorted(set(expected) - set(got))}\n"
        f"unexpected: {sorted(set(got) - set(expected))}\n"
        f"repeated: {sorted(d for d, n in got.items() if n > 1)}\n"
        f"upstream requests:\n{log.describe()}"
    )


def served_from_cache(log: RequestLog, *, context: str) -> None:
    """Assert upstream served no blob GETs and nothing addressed by digest.

    Blobs and manifests named by digest never change, so a mirror that has
    them must not ask upstream again. Tag lookups (HEAD/GET of
    ``manifests/<tag>``) are allowed: revalidating tags is the mirror's call.
    """
    blob_gets = dict(log.blob_gets())
    by_digest = log.manifest_requests_by_digest()
    assert not blob_gets, (
        f"{context}: a cached pull fetched blobs from upstream: {blob_gets}\n"
        f"upstream requests:\n{log.describe()}"
    )
    assert not by_digest, (
        f"{context}: a cached pull asked upstream for manifests by digest\n"
        f"upstream requests:\n{log.describe()}"
    )
