"""skopeo pulling through the mirror: exact bytes, and caching by digest.

skopeo is the strictest of the clients: with ``--preserve-digests`` into a
``dir:`` destination it keeps manifests byte for byte and names every blob
file by the digest it verified, so these tests compare what came through the
mirror with what was generated, bit for bit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from . import expect
from .conftest import Published, Publisher, unique
from .images import Image
from .mirror_process import MirrorProcess
from .skopeo import DirImage, Skopeo, sha256_of
from .upstream import Upstream

MiB = 1 << 20


def assert_same_image(got: DirImage, published: Published, image: Image) -> None:
    """``got`` holds exactly the generated manifest, config and layers."""
    source = published.layout.path
    assert set(got.blobs) == image.blob_digests
    for digest, data in got.blobs.items():
        assert sha256_of(data) == digest, f"{digest}: content does not match"
    for layer in image.layers:
        assert len(got.blobs[layer.digest]) == layer.descriptor.size
    original = source / "blobs" / "sha256" / image.config.digest.removeprefix("sha256:")
    if original.exists():
        assert got.blobs[image.config.digest] == original.read_bytes()


async def test_copy_through_mirror_then_from_cache(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    published = await publish.image(
        unique("library/skopeo-"), layer_sizes=[300_000, MiB, 2 * MiB]
    )
    image = published.single
    reference = f"{published.repository}:{published.tag}"

    mark = upstream.mark()
    first = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "first")
    assert first.manifest_digest == image.digest
    assert_same_image(first, published, image)
    expect.fetched_once(
        await upstream.requests_since(mark), image.blob_digests, context="first copy"
    )

    mark = upstream.mark()
    second = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "second")
    assert second == first
    expect.served_from_cache(await upstream.requests_since(mark), context="re-copy")


async def test_copy_by_digest(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    published = await publish.image(unique("library/skopeo-"), flavour="docker")
    image = published.single
    reference = f"{published.repository}@{image.digest}"

    mark = upstream.mark()
    got = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "first")
    assert got.manifest_digest == image.digest
    assert_same_image(got, published, image)
    expect.fetched_once(
        await upstream.requests_since(mark), image.blob_digests, context="by digest"
    )

    mark = upstream.mark()
    again = await skopeo.pull_to_dir(mirror.host, reference, tmp_path / "again")
    assert again == got
    log = await upstream.requests_since(mark)
    expect.served_from_cache(log, context="re-copy by digest")
    assert not log.requests, (
        "a pull by digest of cached content should not reach upstream at all\n"
        f"{log.describe()}"
    )


async def test_copy_all_platforms_of_an_index(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    # Docker manifest-list media types: what most of Docker Hub serves.
    published = await publish.multiarch(unique("library/skopeo-"), flavour="docker")
    index = published.multi
    reference = f"{published.repository}:{published.tag}"

    mark = upstream.mark()
    got = await skopeo.pull_to_dir(
        mirror.host, reference, tmp_path / "first", all_images=True
    )
    assert got.manifest_digest == index.digest
    assert set(got.child_manifests) == {child.digest for child in index.children}
    for digest, data in got.child_manifests.items():
        assert sha256_of(data) == digest
    assert set(got.blobs) == index.blob_digests
    for digest, data in got.blobs.items():
        assert sha256_of(data) == digest
    expect.fetched_once(
        await upstream.requests_since(mark), index.blob_digests, context="--all copy"
    )

    mark = upstream.mark()
    again = await skopeo.pull_to_dir(
        mirror.host, reference, tmp_path / "again", all_images=True
    )
    assert again == got
    expect.served_from_cache(await upstream.requests_since(mark), context="re-copy")


async def test_concurrent_copies_fetch_each_blob_once(
    mirror: MirrorProcess,
    upstream: Upstream,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    # Big enough that the copies overlap while the first download is running.
    published = await publish.image(
        unique("library/skopeo-"), layer_sizes=[4 * MiB, 3 * MiB]
    )
    image = published.single
    reference = f"{published.repository}:{published.tag}"
    clients = 4

    mark = upstream.mark()
    results = await asyncio.gather(
        *(
            skopeo.pull_to_dir(mirror.host, reference, tmp_path / f"copy{n}")
            for n in range(clients)
        )
    )
    for got in results:
        assert got.manifest_digest == image.digest
        assert_same_image(got, published, image)
    expect.fetched_once(
        await upstream.requests_since(mark),
        image.blob_digests,
        context=f"{clients} concurrent copies",
    )
