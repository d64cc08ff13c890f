"""dockerd pulling Docker Hub names through the mirror (``--registry-mirror``).

dockerd 20.10's sequence against a mirror: ``GET /v2/``, ``HEAD
manifests/<tag>`` (or, for a digest pull, straight to ``GET
manifests/<digest>``), ``GET manifests/<digest>`` for the index and then the
platform's manifest, then the config and layer blobs in parallel. It sends
every accepted media type as a separate ``Accept`` header. If the mirror
fails, dockerd silently falls back to registry-1.docker.io, which is
unreachable here, so a mirror bug surfaces as a DNS or connection error in
the pull.

The image id dockerd reports is the config digest, and ``RepoDigests`` holds
the digest of what the tag points at (the index, for a multi-arch image).
"""

from __future__ import annotations

from typing import Any

from . import expect
from .conftest import Published, Publisher, unique
from .docker_daemon import DockerDaemon, DockerEngine
from .images import Image
from .upstream import Upstream

MiB = 1 << 20


def short_name(repository: str) -> str:
    """How dockerd names a Docker Hub repository: without ``library/``."""
    return repository.removeprefix("library/")


def assert_image(
    info: dict[str, Any] | None, published: Published, image: Image
) -> None:
    assert info is not None, f"{published.repository} is not in dockerd"
    assert info["Id"] == image.config.digest
    assert info["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]
    assert (info["Os"], info["Architecture"]) == (image.os, image.architecture)
    assert (
        f"{short_name(published.repository)}@{published.digest}" in info["RepoDigests"]
    )


async def pull_remove_repull(
    docker: DockerDaemon,
    upstream: Upstream,
    published: Published,
    image: Image,
    *,
    tag: str,
) -> None:
    """Pull, check, remove, pull again; the second pull must be all cache hits.

    ``tag`` is a tag or a ``sha256:`` digest, as the Engine API takes it.
    """
    name = published.repository
    ref = f"{short_name(name)}@{tag}" if tag.startswith("sha256:") else f"{name}:{tag}"
    async with DockerEngine(docker.socket_path) as engine:
        mark = upstream.mark()
        await engine.pull(name, tag)
        assert_image(await engine.inspect(ref), published, image)
        expect.fetched_once(
            await upstream.requests_since(mark), image.blob_digests, context="pull"
        )

        await engine.remove(ref)
        assert await engine.inspect(ref) is None

        mark = upstream.mark()
        await engine.pull(name, tag)
        assert_image(await engine.inspect(ref), published, image)
        expect.served_from_cache(
            await upstream.requests_since(mark), context="pull after rmi"
        )
        await engine.remove(ref)


async def test_pull_multi_layer_library_image(
    docker: DockerDaemon, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.image(
        unique("library/docker-"),
        flavour="docker",
        layer_sizes=[100_000, 700_000, MiB, 2 * MiB],
    )
    await pull_remove_repull(docker, upstream, published, published.single, tag="1")


async def test_pull_multi_arch_image(
    docker: DockerDaemon, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("library/docker-"))
    amd64 = published.multi.for_platform("linux", "amd64")
    # fetched_once inside also proves the arm64 blobs were never fetched.
    await pull_remove_repull(docker, upstream, published, amd64, tag="1")


async def test_pull_non_library_repository(
    docker: DockerDaemon, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.image(unique("someuser/app-"), tag="v2")
    await pull_remove_repull(docker, upstream, published, published.single, tag="v2")


async def test_pull_by_digest(
    docker: DockerDaemon, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("library/docker-"), flavour="docker")
    amd64 = published.multi.for_platform("linux", "amd64")
    await pull_remove_repull(docker, upstream, published, amd64, tag=published.digest)
