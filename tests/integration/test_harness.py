"""Self-tests of the integration harness, with no mirror involved.

If these fail, the problem is in the test machinery or the environment (the
registry, skopeo, dockerd or containerd), not in the mirror. They check that
generated images are internally consistent, that the registry log parser
counts what the registry served, and that dockerd and containerd pull our
images when the real registry itself plays the mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

from .conftest import Publisher, unique
from .containerd_daemon import Containerd
from .daemon_dirs import make_daemon_dir, remove_daemon_dir
from .docker_daemon import DockerDaemon, DockerEngine
from .images import MEDIA_TYPES, Flavour, Image, build_image, build_multiarch
from .skopeo import Skopeo, sha256_of
from .tools import ProcessDied, require_tool
from .upstream import Upstream, parse_requests


def _blob(layout_dir: Path, digest: str) -> bytes:
    hex_digest = digest.removeprefix("sha256:")
    # OCI layouts keep blobs under blobs/sha256/, dir: layouts at the top.
    for candidate in (
        layout_dir / "blobs" / "sha256" / hex_digest,
        layout_dir / hex_digest,
    ):
        if candidate.exists():
            return candidate.read_bytes()
    return (layout_dir / f"{hex_digest}.manifest.json").read_bytes()


def _check_image(layout_dir: Path, image: Image) -> None:
    manifest = json.loads(_blob(layout_dir, image.digest))
    assert manifest["config"]["digest"] == image.config.digest
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests
    config = json.loads(_blob(layout_dir, image.config.digest))
    assert (config["os"], config["architecture"]) == (image.os, image.architecture)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    assert len(config["history"]) == len(image.layers)
    for layer in image.layers:
        compressed = _blob(layout_dir, layer.digest)
        assert sha256_of(compressed) == layer.digest
        assert len(compressed) == layer.descriptor.size
        tar_bytes = gzip.decompress(compressed)
        assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == layer.diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            names = {member.name for member in tar.getmembers() if member.isfile()}
        assert names == set(layer.files)


@pytest.mark.parametrize("flavour", get_args(Flavour))
def test_generated_image_is_consistent(tmp_path: Path, flavour: Flavour) -> None:
    layout = build_image(
        tmp_path / "img",
        layer_sizes=[1000, 20_000, 300_000],
        flavour=flavour,
    )
    assert isinstance(layout.image, Image)
    assert len(layout.image.layers) == 3
    assert layout.image.manifest.media_type == MEDIA_TYPES[flavour]["manifest"]
    _check_image(layout.path, layout.image)
    # Same inputs, same bytes: failures are reproducible.
    again = build_image(
        tmp_path / "again",
        layer_sizes=[1000, 20_000, 300_000],
        flavour=flavour,
    )
    assert again.image.digest == layout.image.digest


def test_generated_index_has_both_platforms(tmp_path: Path) -> None:
    layout = build_multiarch(tmp_path / "idx")
    index = json.loads(_blob(layout.path, layout.image.digest))
    platforms = [
        (entry["platform"]["os"], entry["platform"]["architecture"])
        for entry in index["manifests"]
    ]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    multi = layout.image
    assert not isinstance(multi, Image)
    for child in multi.children:
        _check_image(layout.path, child)
    amd64, arm64 = multi.children
    assert not amd64.blob_digests & arm64.blob_digests


def test_parse_requests_reads_access_and_logrus_lines() -> None:
    access = (
        '127.0.0.1 - - [22/Nov/2026:07:01:32 +0000] "GET /v2/library/b/blobs/'
        'sha256:6abd?ns=docker.io HTTP/1.1" 200 571 "" "containerd/1.6.20~ds1"\n'
        '127.0.0.1 - - [22/Nov/2026:06:59:57 +0000] "HEAD /v2/library/x/manifests/1'
        ' HTTP/1.1" 404 91 "" "curl/7.88.1"\n'
    )
    logrus = (
        'time="2026-11-22T06:59:57Z" level=error msg="response completed with error"'
        ' err.code="manifest unknown" http.request.method=HEAD'
        " http.request.uri=/v2/library/x/manifests/1"
        " http.request.useragent=curl/7.88.1 http.response.status=404\n"
    )
    both = parse_requests(logrus + access)
    assert [(r.method, r.path, r.query, r.status) for r in both] == [
        ("GET", "/v2/library/b/blobs/sha256:6abd", "ns=docker.io", 200),
        ("HEAD", "/v2/library/x/manifests/1", "", 404),
    ]
    assert both[0].kind == "blob"
    assert both[0].by_digest
    assert both[1].repository == "library/x"
    assert both[1].reference == "1"
    # Without an access log, the logrus lines are counted instead.
    only_logrus = parse_requests(logrus)
    assert [(r.method, r.uri, r.status) for r in only_logrus] == [
        ("HEAD", "/v2/library/x/manifests/1", 404)
    ]


async def test_registry_round_trip_and_request_log(
    upstream: Upstream, publish: Publisher, skopeo: Skopeo, tmp_path: Path
) -> None:
    published = await publish.multiarch(unique("library/harness"), flavour="docker")
    mark = upstream.mark()
    got = await skopeo.pull_to_dir(
        upstream.host,
        f"{published.repository}:1",
        tmp_path / "out",
        all_images=True,
    )
    assert got.manifest_digest == published.digest
    assert set(got.child_manifests) == {c.digest for c in published.multi.children}
    assert set(got.blobs) == published.multi.blob_digests
    for digest, data in got.blobs.items():
        assert sha256_of(data) == digest
    log = await upstream.requests_since(mark)
    assert log.blob_gets() == dict.fromkeys(published.multi.blob_digests, 1), (
        log.describe()
    )


@pytest.fixture(scope="module")
def registry_as_mirror_docker(
    dockerd_bin: str, upstream: Upstream
) -> Iterator[DockerDaemon]:
    """dockerd using the real registry as its mirror: the reference behaviour."""
    daemon = DockerDaemon(
        binary=dockerd_bin, directory=make_daemon_dir(), mirror_url=upstream.url
    )
    try:
        try:
            daemon.start()
        except (ProcessDied, TimeoutError) as error:
            pytest.fail(str(error), pytrace=False)
        yield daemon
    finally:
        daemon.stop()
        remove_daemon_dir(daemon.directory)


async def test_dockerd_pulls_with_registry_as_mirror(
    registry_as_mirror_docker: DockerDaemon, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("library/harness"))
    amd64 = published.multi.for_platform("linux", "amd64")
    mark = upstream.mark()
    async with DockerEngine(registry_as_mirror_docker.socket_path) as engine:
        await engine.pull(published.repository, "1")
        info = await engine.inspect(f"{published.repository}:1")
    assert info is not None
    assert info["Id"] == amd64.config.digest
    short_name = published.repository.removeprefix("library/")
    assert info["RepoDigests"] == [f"{short_name}@{published.digest}"]
    log = await upstream.requests_since(mark)
    assert log.blob_gets() == dict.fromkeys(amd64.blob_digests, 1), log.describe()


async def test_containerd_pulls_with_registry_as_mirror(
    containerd_bin: str, ctr_bin: str, upstream: Upstream, publish: Publisher
) -> None:
    published = await publish.multiarch(unique("library/harness"))
    daemon = Containerd(
        binary=containerd_bin,
        ctr=ctr_bin,
        directory=make_daemon_dir(),
        mirror_url=upstream.url,
    )
    try:
        try:
            daemon.start()
        except (ProcessDied, TimeoutError) as error:
            pytest.fail(str(error), pytrace=False)
        ref = f"docker.io/{published.repository}:1"
        await daemon.pull(ref)
        assert (await daemon.image_digests())[ref] == published.digest
        amd64 = published.multi.for_platform("linux", "amd64")
        content = await daemon.content_digests()
        assert {published.digest, amd64.digest, *amd64.blob_digests} <= content
    finally:
        daemon.stop()
        remove_daemon_dir(daemon.directory)


def test_missing_tool_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = "mirror-test-no-such-tool"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=missing):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_tool(missing)
    # A preferred path that does not exist falls back to searching PATH.
    tool = tmp_path / "bin" / "mirror-test-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert require_tool(tool.name, prefer="/nonexistent/tool") == str(tool)
