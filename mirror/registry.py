"""Registry: one upstream registry as the cache serves it; Registries: all of them.

A `Registry` bundles what belongs to one upstream: its client (which owns
authentication, the token cache, rate-limit tracking, retries and the down
state), its metrics with the `registry` label bound, its tag policy
(`tag_ttl`, `max_stale`) and which repositories it may serve (`allow` /
`deny`). The cache takes a Registry with every request, so it never branches
on a registry's name; blobs and manifests stay shared, content-addressed.

`Registries` is the set the configuration defines, docker.io always among
them, looked up by the host name clients use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mirror.config import DOCKER_HUB_HOSTS, DOCKER_IO, RegistryConfig
from mirror.errors import RepositoryDenied
from mirror.metrics import RegistryMetrics
from mirror.reference import parse_name
from mirror.upstream.client import (
    BlobResponse,
    ManifestInfo,
    Passthrough,
    UpstreamStatus,
)


class Upstream(Protocol):
    """What the cache needs from upstream (UpstreamClient implements it)."""

    async def head_manifest(self, repository: str, reference: str) -> ManifestInfo: ...

    async def get_manifest(
        self, repository: str, reference: str
    ) -> tuple[ManifestInfo, bytes]: ...

    def blob(
        self, repository: str, digest: str, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobResponse]: ...

    async def head_blob(self, repository: str, digest: str) -> int | None: ...

    async def list_tags(
        self, repository: str, params: dict[str, str]
    ) -> Passthrough: ...

    async def get_referrers(
        self, repository: str, digest: str, params: dict[str, str]
    ) -> Passthrough | None: ...

    def status(self) -> UpstreamStatus: ...


class RepositoryPolicy:
    """Which repositories may be pulled through: `allow` and `deny` globs.

    `*` and `?` stay within one path component (`owner/*` is owner's
    repositories, not their sub-paths); `**` crosses `/`. An empty `allow`
    allows everything; `deny` wins over `allow`.
    """

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self._allow = [_compile(p) for p in allow]
        self._deny = [_compile(p) for p in deny]

    def permits(self, repository: str) -> bool:
        if any(p.fullmatch(repository) for p in self._deny):
            return False
        return not self._allow or any(p.fullmatch(repository) for p in self._allow)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(p) or re.escape(p) for p in parts))


class Registry:
    """One upstream registry: its client, metrics and policies.

    `tag_ttl`, `max_stale` and the client's rate-limit warning level may be
    changed while serving (SIGHUP).
    """

    def __init__(
        self,
        config: RegistryConfig,
        upstream: Upstream,
        metrics: RegistryMetrics,
    ) -> None:
        self.name = config.host
        self.upstream = upstream
        self.metrics = metrics
        self.tag_ttl = config.tag_ttl
        self.max_stale = config.max_stale
        self.resume_attempts = config.upstream.resume_attempts
        self.read_timeout = config.upstream.read_timeout
        self.policy = RepositoryPolicy(config.upstream.allow, config.upstream.deny)
        # Docker Hub keeps its official images under library/.
        self._official = "library" if config.host == DOCKER_IO else None

    def __repr__(self) -> str:
        return f"Registry({self.name!r})"

    def repository(self, name: str) -> str:
        """The repository a client's `name` means here, if it may be served.

        Raises NameInvalid, RepositoryDenied (no upstream request is made).
        """
        repository = parse_name(name, official=self._official)
        if not self.policy.permits(repository):
            self.metrics.denials.inc()
            raise RepositoryDenied(
                "this mirror does not serve that repository",
                {"registry": self.name, "repository": repository},
            )
        return repository


class Registries:
    """Every registry the mirror serves, by the host name clients use."""

    def __init__(self, registries: Iterable[Registry]) -> None:
        self._by_name = {r.name: r for r in registries}
        if DOCKER_IO not in self._by_name:
            raise ValueError("docker.io must be among the registries")

    @property
    def default(self) -> Registry:
        """docker.io: what a request naming no registry is for."""
        return self._by_name[DOCKER_IO]

    def get(self, host: str) -> Registry | None:
        """The registry for `host` (any of Docker Hub's names means docker.io),
        or None when it is not configured."""
        host = host.lower()
        return self._by_name.get(DOCKER_IO if host in DOCKER_HUB_HOSTS else host)

    def __iter__(self) -> Iterator[Registry]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
