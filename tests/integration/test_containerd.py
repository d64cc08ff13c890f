"""containerd (``ctr images pull --hosts-dir``) pulling through the mirror.

containerd 1.6 talks to a mirror host from ``hosts.toml`` without pinging
``/v2/``: ``HEAD manifests/<tag>``, then ``GET manifests/<digest>`` for the
index and the chosen platform's manifest, then the blobs. It adds
``?ns=docker.io`` to every request and sends one comma-separated ``Accept``
header ending in ``*/*``.
"""

from __future__ import annotations

from . import expect
from .conftest import Publisher, unique
from .containerd_daemon import Containerd
from .upstream import Upstream


async def test_pull_multi_arch_image(
    containerd: Containerd, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("library/ctr-"), flavour="docker")
    index = published.multi
    amd64 = index.for_platform("linux", "amd64")
    arm64 = index.for_platform("linux", "arm64")
    ref = f"docker.io/{published.repository}:{published.tag}"
    wanted = {index.digest, amd64.digest, *amd64.blob_digests}

    mark = upstream.mark()
    await containerd.pull(ref)
    assert (await containerd.image_digests())[ref] == index.digest
    content = await containerd.content_digests()
    assert wanted <= content
    assert not content & arm64.blob_digests, "ctr fetched another platform"
    expect.fetched_once(
        await upstream.requests_since(mark), amd64.blob_digests, context="ctr pull"
    )

    await containerd.remove_image(ref)
    assert not wanted & await containerd.content_digests(), "content not removed"

    mark = upstream.mark()
    await containerd.pull(ref)
    assert (await containerd.image_digests())[ref] == index.digest
    assert wanted <= await containerd.content_digests()
    expect.served_from_cache(
        await upstream.requests_since(mark), context="ctr pull after rm"
    )
    await containerd.remove_image(ref)


async def test_pull_all_platforms(
    containerd: Containerd, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("someuser/ctr-"))
    index = published.multi
    ref = f"docker.io/{published.repository}:{published.tag}"

    mark = upstream.mark()
    await containerd.pull(ref, "--all-platforms")
    content = await containerd.content_digests()
    children = {child.digest for child in index.children}
    assert {index.digest, *children, *index.blob_digests} <= content
    expect.fetched_once(
        await upstream.requests_since(mark),
        index.blob_digests,
        context="ctr pull --all-platforms",
    )
    await containerd.remove_image(ref)
