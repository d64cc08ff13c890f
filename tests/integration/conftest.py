"""Fixtures for integration tests: real registry, real mirror, real clients.

Everything here runs on 127.0.0.1 and generates its own images, so nothing
reaches the internet. Scopes follow start-up cost and isolation needs:

* ``upstream`` (session): a distribution registry the tests push to.
* ``mirror`` (session): ``python -m mirror serve`` in front of ``upstream``.
  Long-lived because dockerd is configured with its address; tests stay
  independent by pushing images under unique repository names.
* ``docker`` / ``containerd`` (module): daemons pulling through ``mirror``.
* ``token_upstream`` (session): a registry requiring Bearer tokens from
  ``token_server``, the way Docker Hub does.
* ``mirror_factory`` / ``upstream_factory`` (function): extra, private
  instances for tests that restart or break things.

Every test in this directory gets the ``integration`` marker. When a test
fails, the mirror's, registry's and daemons' log output since the test
started is attached to the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from tests.fakes.tls import TlsFiles

from .containerd_daemon import Containerd
from .daemon_dirs import make_daemon_dir, remove_daemon_dir
from .docker_daemon import DockerDaemon
from .images import (
    Flavour,
    Image,
    Layout,
    MultiArchImage,
    build_image,
    build_multiarch,
)
from .mirror_process import MirrorProcess
from .skopeo import Skopeo
from .token_server import TokenServer
from .tools import ManagedProcess, ProcessDied, require_tool
from .upstream import Upstream

HERE = Path(__file__).resolve().parent
# Debian's daemon, preferred when present: the tests are written against
# dockerd 20.10, and a different Docker install may come first on PATH.
DOCKERD_PATH = "/usr/sbin/dockerd"


def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers the marker too; repeating it lets this directory
    # run on its own (``pytest tests/integration``) under --strict-markers.
    config.addinivalue_line(
        "markers", "integration: needs real registry/mirror/client processes"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


# --- failure diagnostics ----------------------------------------------------

LogSource = tuple[str, ManagedProcess, int]
DIAGNOSTICS = pytest.StashKey[list[LogSource]]()


@pytest.fixture(autouse=True)
def _log_marks(request: pytest.FixtureRequest) -> None:
    """Remember where each shared process's log stood when the test started."""
    sources = request.node.stash.setdefault(DIAGNOSTICS, [])
    for name in ("upstream", "token_upstream", "mirror", "docker", "containerd"):
        if name not in request.fixturenames:
            continue
        owner = request.getfixturevalue(name)
        process: ManagedProcess | None = owner.process
        if process is None:
            continue
        if not process.alive():
            # A shared process died in an earlier test; say so once, clearly,
            # instead of letting this test fail with "connection refused".
            pytest.fail(
                f"shared {name} process is no longer running; its log:\n"
                f"{process.log_text(limit=15_000)}",
                pytrace=False,
            )
        sources.append((name, process, process.log_size()))


def _log_offset(log_path: Path) -> int:
    """Log offset to report from if the test fails (the file may be reused)."""
    try:
        return log_path.stat().st_size
    except FileNotFoundError:
        return 0


def _attach(
    request: pytest.FixtureRequest, name: str, process: ManagedProcess | None, mark: int
) -> None:
    """Attach a per-test process's log to the failure report."""
    if process is not None:
        sources = request.node.stash.setdefault(DIAGNOSTICS, [])
        sources.append((name, process, mark))


def watch_log(
    request: pytest.FixtureRequest, name: str, process: ManagedProcess | None
) -> None:
    """Attach ``process``'s log from this point on to the failure report
    (for a module's own shared processes)."""
    if process is not None:
        _attach(request, name, process, process.log_size())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when == "call":
        for name, process, mark in item.stash.get(DIAGNOSTICS, []):
            text = process.log_text(since=mark, limit=15_000)
            report.sections.append((f"{name} log during test", text or "(empty)"))
    return report


# --- tools ------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_bin() -> str:
    return require_tool("docker-registry")


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    binary = require_tool("skopeo")
    return Skopeo.create(binary, tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="session")
def dockerd_bin() -> str:
    return require_tool("dockerd", prefer=DOCKERD_PATH)


@pytest.fixture(scope="session")
def containerd_bin() -> str:
    return require_tool("containerd")


@pytest.fixture(scope="session")
def ctr_bin() -> str:
    return require_tool("ctr")


# --- processes ----------------------------------------------------------------


def start_or_fail(start: Callable[[], None]) -> None:
    """Run a start-up function, turning its failure into a readable fail."""
    try:
        start()
    except (ProcessDied, TimeoutError) as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def upstream(
    registry_bin: str, skopeo: Skopeo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstream]:
    registry = Upstream(
        binary=registry_bin,
        skopeo=skopeo,
        workdir=tmp_path_factory.mktemp("upstream"),
    )
    try:
        start_or_fail(registry.start)
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(workdir=tmp_path_factory.mktemp("token"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_upstream(
    registry_bin: str,
    skopeo: Skopeo,
    token_server: TokenServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Upstream]:
    """A registry demanding Bearer tokens from ``token_server``, like Docker Hub."""
    registry = Upstream(
        binary=registry_bin,
        skopeo=skopeo,
        workdir=tmp_path_factory.mktemp("token-upstream"),
        auth=token_server.registry_auth_config(),
    )
    try:
        start_or_fail(registry.start)
        yield registry
    finally:
        registry.stop()


UpstreamFactory = Callable[[], Upstream]


@pytest.fixture
def upstream_factory(
    registry_bin: str, skopeo: Skopeo, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[UpstreamFactory]:
    """Start private registries, e.g. for a test that stops its upstream."""
    started: list[Upstream] = []

    def factory() -> Upstream:
        registry = Upstream(
            binary=registry_bin,
            skopeo=skopeo,
            workdir=tmp_path / f"upstream{len(started)}",
        )
        started.append(registry)
        try:
            start_or_fail(registry.start)
        finally:
            _attach(request, f"upstream #{len(started)}", registry.process, 0)
        return registry

    yield factory
    for registry in started:
        registry.stop()


@pytest.fixture(scope="session")
def mirror(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MirrorProcess]:
    process = MirrorProcess(
        upstream_url=upstream.url, workdir=tmp_path_factory.mktemp("mirror")
    )
    try:
        start_or_fail(process.start)
        yield process
    finally:
        process.stop()


class MirrorFactory(Protocol):
    def __call__(
        self,
        upstream_url: str,
        workdir: Path | None = None,
        extra_toml: str = "",
        upstream_toml: str = "",
    ) -> MirrorProcess: ...


@pytest.fixture
def mirror_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MirrorFactory]:
    """Start private mirrors in front of ``upstream_url``.

    Reusing a ``workdir`` reuses its cache directory, which is how tests
    restart a mirror on the same cache; ``extra_toml`` lands in ``[cache]``
    and ``upstream_toml`` in ``[upstream]`` (see ``MirrorProcess``).
    """
    started: list[MirrorProcess] = []

    def factory(
        upstream_url: str,
        workdir: Path | None = None,
        extra_toml: str = "",
        upstream_toml: str = "",
    ) -> MirrorProcess:
        process = MirrorProcess(
            upstream_url=upstream_url,
            workdir=workdir or tmp_path / f"mirror{len(started)}",
            extra_toml=extra_toml,
            upstream_toml=upstream_toml,
        )
        started.append(process)
        mark = _log_offset(process.log_path)
        try:
            start_or_fail(process.start)
        finally:
            _attach(request, f"mirror #{len(started)}", process.process, mark)
        return process

    yield factory
    for process in started:
        process.stop()


@contextlib.contextmanager
def _running_docker(binary: str, mirror_url: str) -> Iterator[DockerDaemon]:
    """A dockerd pulling through ``mirror_url``, stopped and removed after."""
    daemon = DockerDaemon(
        binary=binary, directory=make_daemon_dir(), mirror_url=mirror_url
    )
    try:
        start_or_fail(daemon.start)
        yield daemon
    finally:
        daemon.stop()
        remove_daemon_dir(daemon.directory)


@pytest.fixture(scope="module")
def docker(dockerd_bin: str, mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    with _running_docker(dockerd_bin, mirror.url) as daemon:
        yield daemon


DockerFactory = Callable[[MirrorProcess], DockerDaemon]


@pytest.fixture
def docker_factory(
    dockerd_bin: str, request: pytest.FixtureRequest
) -> Iterator[DockerFactory]:
    """Start private dockerds, each pulling through a test's own mirror.

    dockerd takes its mirror URL at start-up, so a test that starts its own
    mirror needs its own daemon (about a second to start and stop).
    """
    with contextlib.ExitStack() as stack:

        def factory(mirror: MirrorProcess) -> DockerDaemon:
            daemon = stack.enter_context(_running_docker(dockerd_bin, mirror.url))
            _attach(request, "dockerd", daemon.process, 0)
            return daemon

        yield factory


@contextlib.contextmanager
def running_containerd(
    containerd_bin: str, ctr_bin: str, mirror_url: str, **options: Any
) -> Iterator[Containerd]:
    """A started Containerd pulling through `mirror_url` (`options` go to
    Containerd, e.g. `registries`); stopped and its directory removed after."""
    daemon = Containerd(
        binary=containerd_bin,
        ctr=ctr_bin,
        directory=make_daemon_dir(),
        mirror_url=mirror_url,
        **options,
    )
    try:
        start_or_fail(daemon.start)
        yield daemon
    finally:
        daemon.stop()
        remove_daemon_dir(daemon.directory)


@pytest.fixture(scope="module")
def containerd(
    containerd_bin: str, ctr_bin: str, mirror: MirrorProcess
) -> Iterator[Containerd]:
    with running_containerd(containerd_bin, ctr_bin, mirror.url) as daemon:
        yield daemon


# --- images -------------------------------------------------------------------


def unique(prefix: str) -> str:
    """``prefix`` plus a random suffix: a repository no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Published:
    """An image generated on disk and pushed to an upstream registry."""

    repository: str
    tag: str
    layout: Layout

    @property
    def image(self) -> Image | MultiArchImage:
        return self.layout.image

    @property
    def digest(self) -> str:
        return self.layout.image.digest

    @property
    def single(self) -> Image:
        assert isinstance(self.layout.image, Image)
        return self.layout.image

    @property
    def multi(self) -> MultiArchImage:
        assert isinstance(self.layout.image, MultiArchImage)
        return self.layout.image


class Publisher:
    """Builds images under a test's tmp dir and pushes them to a registry.

    The generator seed defaults to the repository name, so images pushed
    under different names never share blobs (which would let one test's
    pull warm the mirror's cache for another).
    """

    def __init__(self, upstream: Upstream, workdir: Path) -> None:
        self._upstream = upstream
        self._workdir = workdir

    async def image(
        self,
        repository: str,
        *,
        tag: str = "1",
        flavour: Flavour = "oci",
        layer_sizes: list[int] | None = None,
        to: Upstream | None = None,
        layer_seeds: Sequence[str | None] = (),
    ) -> Published:
        """Build a single-platform linux/amd64 image, push it as repository:tag.

        ``layer_seeds`` makes layers shared with other images (see
        ``build_image``)."""
        build = functools.partial(build_image, layer_seeds=layer_seeds)
        return await self._publish(build, repository, tag, flavour, layer_sizes, to)

    async def multiarch(
        self,
        repository: str,
        *,
        tag: str = "1",
        flavour: Flavour = "oci",
        layer_sizes: list[int] | None = None,
        to: Upstream | None = None,
    ) -> Published:
        """Build a linux/amd64 + linux/arm64 index, push it as repository:tag."""
        return await self._publish(
            build_multiarch, repository, tag, flavour, layer_sizes, to
        )

    async def _publish(
        self,
        build: Callable[..., Layout],
        repository: str,
        tag: str,
        flavour: Flavour,
        layer_sizes: list[int] | None,
        to: Upstream | None,
    ) -> Published:
        layout = await asyncio.to_thread(
            build,
            self._workdir / uuid.uuid4().hex,
            tag=tag,
            seed=repository,
            flavour=flavour,
            layer_sizes=layer_sizes,
        )
        await (to or self._upstream).push(layout, repository, tag)
        return Published(repository=repository, tag=tag, layout=layout)


@pytest.fixture
def publish(upstream: Upstream, tmp_path: Path) -> Publisher:
    return Publisher(upstream, tmp_path / "images")


@pytest.fixture
async def http(tls_files: TlsFiles) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for talking to the mirror or registry directly;
    it trusts the test CA too, for upstreams served over TLS."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls_files.client_context()),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session
