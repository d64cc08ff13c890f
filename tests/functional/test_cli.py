"""The operator CLI against caches filled by pulling through a running mirror.

The daemon stays up while the commands run (in a thread, through
`mirror.cli.main`), as in production: the database is shared in WAL mode and
blob files leave the store by rename.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from mirror.app import CACHE
from mirror.cache.blobs import BlobStore
from mirror.cli import main
from mirror.logutil import human_size
from mirror.upstream.client import MANIFEST_ACCEPT
from tests.conftest import Mirror, MirrorFactory
from tests.fakes.registry import FakeRegistry, Image

DAY = 86400.0

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def layer(n: int, size: int = 50_000) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (size // 32)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `mirror ARGS...` in a thread (its own event loop, like a separate
    process) while the daemon keeps serving; returns (status, out, err)."""

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


async def cli_json(cli: Cli, *argv: str) -> tuple[int, dict[str, Any]]:
    status, out, err = await cli(*argv, "--json")
    assert out, err
    return status, json.loads(out)


async def pull(mirror: Mirror, repository: str, reference: str) -> list[str]:
    """What a client's pull does: manifest, every child, config and layers.
    Returns the blob digests read."""
    headers = {"Accept": MANIFEST_ACCEPT}
    resp = await mirror.client.get(
        f"/v2/{repository}/manifests/{reference}", headers=headers
    )
    assert resp.status == 200, await resp.text()
    doc = json.loads(await resp.read())
    if "manifests" in doc:
        blobs = []
        for child in doc["manifests"]:
            blobs += await pull(mirror, repository, child["digest"])
        return blobs
    blobs = [doc["config"]["digest"], *(d["digest"] for d in doc["layers"])]
    for digest in blobs:
        blob = await mirror.client.get(f"/v2/{repository}/blobs/{digest}")
        assert blob.status == 200
        await blob.read()
    await mirror.settle()
    return blobs


def cache_dir(mirror: Mirror) -> str:
    return str(mirror.config.cache.dir)


def files(mirror: Mirror) -> set[str]:
    return set(BlobStore(mirror.config.cache.dir).scan())


def rows(mirror: Mirror, sql: str, *params: object) -> set[tuple[object, ...]]:
    with closing(sqlite3.connect(mirror.config.cache.dir / "mirror.db")) as conn:
        return {tuple(r) for r in conn.execute(sql, params).fetchall()}


def blob_rows(mirror: Mirror) -> set[str]:
    return {str(r[0]) for r in rows(mirror, "SELECT digest FROM blobs")}


async def flush(mirror: Mirror) -> None:
    """Write the daemon's batched access times now, not in ten seconds."""
    await mirror.client.app[CACHE].metadata.flush_access()


def size_of(upstream: FakeRegistry, image: Image) -> int:
    return sum(len(upstream.blobs[d]) for d in image.blobs)


# --- status and ls -------------------------------------------------------------


async def test_status_reports_size_budget_counts_and_access(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/alpine", "3", [layer(1), layer(2)])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/alpine", "3")

    status, report = await cli_json(cli, "status", "--cache-dir", cache_dir(mirror))

    assert status == 0
    assert report["size"] == size_of(upstream, image)
    assert report["blobs"] == 3
    assert report["manifests"] == 1
    assert report["tags"] == 1
    assert report["repositories"] == 1
    assert report["oldest_access"] == report["newest_access"] == mirror.clock.now
    assert report["cache_dir"] == cache_dir(mirror)
    assert isinstance(report["disk_free"], int)
    assert report["disk_free"] > 0

    status, out, _ = await cli("status", "--cache-dir", cache_dir(mirror))
    assert status == 0
    assert "blobs          3" in out
    assert "tags           1 in 1 repositories" in out


async def test_status_reads_cache_dir_and_budget_from_config(
    make_mirror: MirrorFactory, cli: Cli, tmp_path: Path
) -> None:
    mirror = await make_mirror()
    config = tmp_path / "mirror.toml"
    config.write_text(f'[cache]\ndir = "{cache_dir(mirror)}"\nmax_size = "3MiB"\n')

    status, report = await cli_json(cli, "status", "--config", str(config))

    assert status == 0
    assert report["cache_dir"] == cache_dir(mirror)
    assert report["max_size"] == 3 * 1024 * 1024
    assert report["blobs"] == 0
    assert report["oldest_access"] is None


async def test_ls_lists_repositories_then_tags_with_image_sizes(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    amd = upstream.push_image("library/alpine", "amd", [layer(1)])
    arm = upstream.push_image("library/alpine", "arm", [layer(2)], architecture="arm64")
    upstream.push_index("library/alpine", "3", [amd, arm])
    app = upstream.push_image("grafana/grafana", "10", [layer(3), layer(4)])
    mirror = await make_mirror(upstream)
    # A client on amd64 pulls the index and only its platform.
    resp = await mirror.client.get(
        "/v2/alpine/manifests/3", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert resp.status == 200
    await pull(mirror, "library/alpine", amd.digest)
    mirror.clock.advance(60)
    await pull(mirror, "grafana/grafana", "10")

    status, listing = await cli_json(cli, "ls", "--cache-dir", cache_dir(mirror))
    assert status == 0
    repos = {r["repository"]: r for r in listing["repositories"]}
    assert sorted(repos) == ["grafana/grafana", "library/alpine"]
    assert repos["grafana/grafana"]["tags"] == 1
    assert repos["grafana/grafana"]["cached"] == size_of(upstream, app)
    assert repos["grafana/grafana"]["last_pulled"] == mirror.clock.now
    assert repos["library/alpine"]["cached"] == size_of(upstream, amd)
    assert repos["library/alpine"]["last_pulled"] == mirror.clock.now - 60

    status, listing = await cli_json(
        cli, "ls", "alpine", "--cache-dir", cache_dir(mirror)
    )
    assert status == 0
    assert listing["repository"] == "library/alpine"
    (tag,) = listing["tags"]
    assert tag["tag"] == "3"
    assert tag["platforms"] == [1, 2]  # one of two platforms cached
    assert tag["size"] == size_of(upstream, amd)
    assert tag["cached"] == size_of(upstream, amd)
    assert tag["manifest_cached"] is True

    status, out, _ = await cli("ls", "library/alpine", "--cache-dir", cache_dir(mirror))
    assert status == 0
    assert out.splitlines()[0] == "library/alpine"
    assert "1/2" in out
    assert "(100%)" in out

    status, out, _ = await cli("ls", "--cache-dir", cache_dir(mirror))
    assert out.splitlines()[0].split() == [
        "REPOSITORY",
        "LAST",
        "PULLED",
        "TAGS",
        "SIZE",
        "CACHED",
    ]
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "grafana/grafana",
        "library/alpine",
    ]


async def test_ls_of_an_unknown_repository_fails(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror = await make_mirror()
    status, _, err = await cli("ls", "nginx", "--cache-dir", cache_dir(mirror))
    assert status == 1
    assert "library/nginx is not in the cache" in err
    status, _, err = await cli("ls", "nginx:1", "--cache-dir", cache_dir(mirror))
    assert status == 2


async def test_an_unknown_repository_as_json_is_an_error_object(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror = await make_mirror()
    status, out, err = await cli(
        "ls", "nginx", "--cache-dir", cache_dir(mirror), "--json"
    )
    assert (status, err) == (1, "")
    assert json.loads(out) == {
        "error": {
            "kind": "not_found",
            "message": "library/nginx is not in the cache",
            "key": None,
            "suggestion": None,
        }
    }
    status, out, err = await cli(
        "purge", "ghcr.io/a/b:1", "--cache-dir", cache_dir(mirror), "--json"
    )
    assert (status, err) == (1, "")
    assert json.loads(out)["error"]["kind"] == "not_found"


# --- purge ---------------------------------------------------------------------


async def two_images_sharing_a_layer(
    make_mirror: MirrorFactory,
) -> tuple[Mirror, FakeRegistry, Image, Image, str]:
    upstream = FakeRegistry()
    shared = layer(100)
    a = upstream.push_image("library/a", "1", [layer(1), shared])
    b = upstream.push_image("team/b", "1", [layer(2), shared])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/a", "1")
    await pull(mirror, "team/b", "1")
    return mirror, upstream, a, b, a.layers[1]


async def test_purge_repository_removes_only_what_nothing_else_uses(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror, upstream, a, b, shared = await two_images_sharing_a_layer(make_mirror)
    await mirror.settle()
    assert files(mirror) == set(a.blobs) | set(b.blobs)

    status, report = await cli_json(cli, "purge", "a", "--cache-dir", cache_dir(mirror))

    assert status == 0
    assert report["dry_run"] is False
    assert report["tags"] == [
        {
            "registry": "docker.io",
            "repository": "library/a",
            "tag": "1",
            "digest": a.digest,
        }
    ]
    assert report["links"] == [
        {"registry": "docker.io", "repository": "library/a", "digest": a.digest}
    ]
    assert [m["digest"] for m in report["manifests"]] == [a.digest]
    gone = {a.config_digest, a.layers[0]}
    assert {blob["digest"] for blob in report["blobs"]} == gone
    assert report["freed"] == sum(len(upstream.blobs[d]) for d in gone)
    # Exactly those files and rows left; the shared layer survived.
    await mirror.settle()
    assert files(mirror) == set(b.blobs)
    assert blob_rows(mirror) == set(b.blobs)
    assert shared in files(mirror)
    assert rows(mirror, "SELECT repository, tag FROM tags") == {("team/b", "1")}
    assert rows(mirror, "SELECT digest FROM manifests") == {(b.digest,)}
    assert not list((mirror.config.cache.dir / "tmp").iterdir())

    # The other image is still served entirely from cache...
    blob_gets = upstream.count("blob", "GET")
    await pull(mirror, "team/b", "1")
    assert upstream.count("blob", "GET") == blob_gets
    # ...and the purged one is fetched again, except the shared layer.
    await pull(mirror, "library/a", "1")
    assert upstream.count("blob", "GET") == blob_gets + 2


async def test_purge_prints_what_it_removed(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror, _, a, _, _ = await two_images_sharing_a_layer(make_mirror)
    status, out, _ = await cli("purge", "library/a:1", "--cache-dir", cache_dir(mirror))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"removed tag library/a:1 (sha256:{a.digest[7:19]})"
    assert f"removed manifest sha256:{a.digest[7:19]} (OCI manifest, " in out
    assert f"removed blob sha256:{a.layers[0][7:19]} (48.8 KiB)" in lines
    assert lines[-1].startswith(
        "removed 1 tag, 1 repository link, 1 manifest and 2 blobs ("
    )


async def test_purge_dry_run_shows_the_same_and_changes_nothing(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror, _, _, _, _ = await two_images_sharing_a_layer(make_mirror)
    before = (files(mirror), rows(mirror, "SELECT * FROM tags"), blob_rows(mirror))
    args = ("purge", "a", "--cache-dir", cache_dir(mirror))

    status, dry = await cli_json(cli, *args, "--dry-run")
    assert status == 0
    assert dry["dry_run"] is True
    assert (files(mirror), rows(mirror, "SELECT * FROM tags"), blob_rows(mirror)) == (
        before
    )
    status, out, _ = await cli(*args, "--dry-run")
    assert out.splitlines()[-1].startswith("would remove 1 tag")

    status, real = await cli_json(cli, *args)
    assert {k: v for k, v in real.items() if k != "dry_run"} == {
        k: v for k, v in dry.items() if k != "dry_run"
    }


async def test_purge_tag_keeps_what_other_tags_of_the_repository_need(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    one = upstream.push_image("library/app", "1", [layer(1)])
    upstream.tags[("library/app", "latest")] = one.digest
    two = upstream.push_image("library/app", "2", [layer(2)])
    mirror = await make_mirror(upstream)
    for tag in ("1", "latest", "2"):
        await pull(mirror, "library/app", tag)
    args = ("--cache-dir", cache_dir(mirror))

    status, report = await cli_json(cli, "purge", "app:2", *args)
    assert status == 0
    assert [m["digest"] for m in report["manifests"]] == [two.digest]
    await mirror.settle()
    assert files(mirror) == set(one.blobs)

    # `latest` still points at what `1` does: only the tag goes.
    status, report = await cli_json(cli, "purge", "app:1", *args)
    assert status == 0
    assert report["tags"] == [
        {
            "registry": "docker.io",
            "repository": "library/app",
            "tag": "1",
            "digest": one.digest,
        }
    ]
    assert report["links"] == report["manifests"] == report["blobs"] == []
    await mirror.settle()
    assert files(mirror) == set(one.blobs)
    assert rows(mirror, "SELECT tag FROM tags") == {("latest",)}

    status, _, err = await cli("purge", "app:9", *args)
    assert status == 1
    assert "library/app:9 is not in the cache" in err


async def test_purge_of_an_index_tag_removes_every_platform(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    amd = upstream.push_image("library/multi", "amd", [layer(1)])
    arm = upstream.push_image("library/multi", "arm", [layer(2)], architecture="arm64")
    index = upstream.push_index("library/multi", "latest", [amd, arm])
    keep = upstream.push_image("library/other", "1", [layer(3)])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/multi", "latest")
    await pull(mirror, "library/other", "1")

    status, report = await cli_json(
        cli, "purge", "multi:latest", "--cache-dir", cache_dir(mirror)
    )

    assert status == 0
    manifests = {m["digest"] for m in report["manifests"]}
    assert manifests == {index, amd.digest, arm.digest}
    links = {link["digest"] for link in report["links"]}
    assert links == {index, amd.digest, arm.digest}
    await mirror.settle()
    assert files(mirror) == set(keep.blobs)
    assert rows(mirror, "SELECT DISTINCT manifest FROM manifest_refs") == {
        (keep.digest,)
    }


async def test_purge_older_than_removes_what_was_not_used_since(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    shared = layer(100)
    old = upstream.push_image("library/old", "1", [layer(1), shared])
    new = upstream.push_image("library/new", "1", [layer(2), shared])
    mirror = await make_mirror(upstream)
    mirror.clock.now = time.time() - 40 * DAY
    await pull(mirror, "library/old", "1")
    mirror.clock.now = time.time() - 1 * DAY
    await pull(mirror, "library/new", "1")  # the shared layer is a hit: touched
    await flush(mirror)
    args = ("purge", "--older-than", "30d", "--cache-dir", cache_dir(mirror))

    status, report = await cli_json(cli, *args, "--dry-run")
    assert status == 0
    assert report["tags"] == [
        {
            "registry": "docker.io",
            "repository": "library/old",
            "tag": "1",
            "digest": old.digest,
        }
    ]

    status, report = await cli_json(cli, *args)
    assert status == 0
    assert [m["digest"] for m in report["manifests"]] == [old.digest]
    await mirror.settle()
    assert files(mirror) == set(new.blobs)
    assert new.layers[1] in files(mirror)  # shared, and used lately
    assert rows(mirror, "SELECT repository FROM tags") == {("library/new",)}

    # A second run finds nothing more.
    status, report = await cli_json(cli, *args)
    assert status == 0
    assert report["tags"] == report["blobs"] == []


async def test_purge_older_than_also_removes_blobs_not_read_since(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    """A tag in use whose layer nobody fetched lately (clients had it)."""
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [layer(1), layer(2)])
    mirror = await make_mirror(upstream)
    mirror.clock.now = time.time() - 40 * DAY
    await pull(mirror, "library/app", "1")
    mirror.clock.now = time.time()
    # A client that has the layers asks for the manifest and the config only.
    resp = await mirror.client.get(f"/v2/library/app/manifests/{image.digest}")
    assert resp.status == 200
    resp = await mirror.client.get(f"/v2/library/app/blobs/{image.config_digest}")
    await resp.read()
    await flush(mirror)

    status, report = await cli_json(
        cli, "purge", "--older-than", "30d", "--cache-dir", cache_dir(mirror)
    )

    assert status == 0
    assert report["manifests"] == []
    assert {b["digest"] for b in report["blobs"]} == set(image.layers)
    await mirror.settle()
    assert files(mirror) == {image.config_digest}
    # The next pull fetches them again.
    await pull(mirror, "library/app", image.digest)
    await mirror.settle()
    assert files(mirror) == set(image.blobs)


async def test_purge_usage_errors_exit_2(make_mirror: MirrorFactory, cli: Cli) -> None:
    mirror = await make_mirror()
    args = ("--cache-dir", cache_dir(mirror))
    for argv in (
        ("purge", *args),
        ("purge", "a", "--older-than", "1d", *args),
        ("purge", "--older-than", "30x", *args),
        ("purge", f"a@sha256:{'0' * 64}", *args),
        ("purge", "Bad/Name", *args),
        ("purge", "ghcr.io/", *args),
        ("purge", "Ghcr.io/Owner/app", *args),
    ):
        status, _, err = await cli(*argv)
        assert status == 2, argv
        assert err.startswith("mirror: "), argv


async def test_commands_without_a_cache_exit_2(tmp_path: Path, cli: Cli) -> None:
    missing = tmp_path / "nothing"
    for command in ("status", "ls", "gc", "verify"):
        status, out, err = await cli(command, "--cache-dir", str(missing))
        assert (status, out) == (2, ""), command
        assert f"no cache in {missing}" in err
    assert not missing.exists()


async def test_bad_config_exits_2(tmp_path: Path, cli: Cli) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text('[cache]\nmax_size = "lots"\n')
    status, _, err = await cli("status", "--config", str(config))
    assert status == 2
    assert "cache.max_size" in err


# --- gc ------------------------------------------------------------------------


async def test_gc_evicts_least_recently_used_down_to_the_low_watermark(
    make_mirror: MirrorFactory, cli: Cli, tmp_path: Path
) -> None:
    upstream = FakeRegistry()
    first = upstream.push_image("library/first", "1", [layer(1, 100_000)])
    second = upstream.push_image("library/second", "1", [layer(2, 100_000)])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/first", "1")
    mirror.clock.advance(10)
    await pull(mirror, "library/second", "1")
    total = size_of(upstream, first) + size_of(upstream, second)
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\nmax_size = {total - 1}\nlow_watermark = "60%"\nmin_free = 0\n'
    )
    args = ("gc", "--config", str(config), "--cache-dir", cache_dir(mirror))

    status, report = await cli_json(cli, *args)

    assert status == 0
    assert report["size_before"] == total
    assert report["evicted"] == 2  # the first image's config and layer
    assert report["size_after"] == size_of(upstream, second)
    assert report["target"] == int((total - 1) * 0.6)
    await mirror.settle()
    assert files(mirror) == blob_rows(mirror) == set(second.blobs)

    status, out, _ = await cli(*args)
    assert status == 0
    assert out.startswith("nothing to evict: ")


# --- verify --------------------------------------------------------------------


async def test_verify_removes_a_corrupt_blob_and_exits_1(
    make_mirror: MirrorFactory, cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/app", "1", [layer(1), layer(2)])
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/app", "1")
    bad = image.layers[1]
    path = BlobStore(mirror.config.cache.dir).blob_dir / "sha256" / bad[7:9] / bad[7:]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # bit rot: same size, wrong bytes
    path.write_bytes(bytes(data))
    args = ("verify", "--cache-dir", cache_dir(mirror))

    status, out, err = await cli(*args)

    assert status == 1
    assert out.strip() == (
        f"verified 3 blobs ({(size_of(upstream, image) / 1024):.1f} KiB): "
        f"1 did not match and was removed\n  removed {bad}"
    )
    assert "verifying: 3/3 blobs" in err  # the final progress line (not a TTY)
    # The log line (on stderr outside pytest) names it.
    assert f"blob {bad} does not match its digest; removed" in caplog.messages
    await mirror.settle()
    assert files(mirror) == blob_rows(mirror) == set(image.blobs) - {bad}

    status, report = await cli_json(cli, *args)
    assert status == 0
    assert report == {
        "checked": 2,
        "bytes": size_of(upstream, image) - len(data),
        "removed": [],
        "rows_dropped": 0,
        "adopted": 0,
    }
    # The mirror fetches the removed blob again on the next pull.
    blob_gets = upstream.count("blob", "GET")
    await pull(mirror, "library/app", "1")
    assert upstream.count("blob", "GET") == blob_gets + 1


# --- running beside the daemon ---------------------------------------------------


async def test_commands_leave_downloads_in_progress_alone(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/done", "1", [layer(1)])
    big = upstream.add_blob(layer(2, 1_000_000))
    mirror = await make_mirror(upstream)
    await pull(mirror, "library/done", "1")
    upstream.gate = asyncio.Event()  # hold the next blob body mid-stream
    download = asyncio.create_task(mirror.client.get(f"/v2/library/x/blobs/{big}"))
    tmp = mirror.config.cache.dir / "tmp"
    for _ in range(200):
        if any(tmp.iterdir()):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the download never made a temp file")
    in_progress = set(tmp.iterdir())

    args = ("--cache-dir", cache_dir(mirror))
    assert (await cli("status", *args))[0] == 0
    assert (await cli("verify", *args))[0] == 0
    assert (await cli("purge", "done", *args))[0] == 0

    assert set(tmp.iterdir()) == in_progress
    upstream.gate.set()
    resp = await download
    assert resp.status == 200
    assert await resp.read() == layer(2, 1_000_000)
    for _ in range(200):  # the row may land just after the last byte
        if big in blob_rows(mirror):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the finished download never got its row")
    assert big in files(mirror)


# --- warm ----------------------------------------------------------------------


def mirror_url(mirror: Mirror) -> str:
    return str(mirror.client.make_url("")).rstrip("/")


async def test_warm_then_pull_costs_no_upstream_blob_request(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/alpine", "3", [layer(1), layer(2)])
    app = upstream.push_image("grafana/grafana", "latest", [layer(3)])
    mirror = await make_mirror(upstream)

    status, out, _ = await cli(
        "warm", "alpine:3", "grafana/grafana", "--mirror", mirror_url(mirror)
    )

    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(
        f"ok      library/alpine:3 sha256:{image.digest[7:19]}: "
    )
    assert "1 manifest, 3 blobs" in lines[0]
    assert lines[1].startswith("ok      grafana/grafana:latest ")
    assert lines[2].startswith("warmed 2 of 2 images: ")
    await mirror.settle()
    assert files(mirror) == set(image.blobs) | set(app.blobs)

    before = upstream.count("blob", "GET")
    await pull(mirror, "library/alpine", "3")
    await pull(mirror, "grafana/grafana", "latest")
    assert upstream.count("blob", "GET") == before


async def test_warm_by_digest_and_json(make_mirror: MirrorFactory, cli: Cli) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("user/app", "1", [layer(1)])
    mirror = await make_mirror(upstream)

    status, report = await cli_json(
        cli, "warm", f"user/app@{image.digest}", "--mirror", mirror_url(mirror)
    )

    assert status == 0
    (result,) = report["images"]
    assert result["repository"] == "user/app"
    assert result["reference"] == image.digest
    assert result["digest"] == image.digest
    assert result["blobs"] == 2
    assert result["bytes"] == size_of(upstream, image)
    assert result["error"] is None
    await mirror.settle()
    assert files(mirror) == set(image.blobs)


async def test_warm_platform_fetches_only_that_platform(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    amd = upstream.push_image("library/multi", "amd", [layer(1)])
    arm = upstream.push_image("library/multi", "arm", [layer(2)], architecture="arm64")
    upstream.push_index("library/multi", "latest", [amd, arm])
    mirror = await make_mirror(upstream)

    status, out, _ = await cli(
        "warm", "multi", "--platform", "linux/arm64", "--mirror", mirror_url(mirror)
    )

    assert status == 0, out
    assert "2 manifests, 2 blobs" in out  # the index and arm64's manifest
    fetched = {r.path.rsplit("/", 1)[1] for r in upstream.requests("blob", "GET")}
    assert fetched == set(arm.blobs)
    await mirror.settle()
    assert files(mirror) == set(arm.blobs)

    # Without --platform, every platform.
    status, out, _ = await cli("warm", "multi", "--mirror", mirror_url(mirror))
    assert status == 0
    assert "3 manifests, 4 blobs" in out
    await mirror.settle()
    assert files(mirror) == set(amd.blobs) | set(arm.blobs)

    status, out, _ = await cli(
        "warm", "multi", "--platform", "linux/s390x", "--mirror", mirror_url(mirror)
    )
    assert status == 1
    assert "has no manifest for linux/s390x" in out


async def test_warm_from_a_list_reports_failures_and_exits_1(
    make_mirror: MirrorFactory, cli: Cli, tmp_path: Path
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/alpine", "3", [layer(1)])
    mirror = await make_mirror(upstream)
    images = tmp_path / "images.txt"
    images.write_text("# base images\nalpine:3   # the small one\n\nnope/missing:1\n")

    status, out, _ = await cli(
        "warm", "--file", str(images), "--mirror", mirror_url(mirror)
    )

    assert status == 1
    lines = out.splitlines()
    assert lines[0].startswith("ok      library/alpine:3 ")
    assert lines[1].startswith("FAILED  nope/missing:1: manifest nope/missing:1: 404")
    assert lines[2].startswith("warmed 1 of 2 images: ")
    assert lines[2].endswith("; 1 failed")
    await mirror.settle()
    assert files(mirror) == set(image.blobs)


async def test_warm_finds_the_mirror_from_server_listen(
    make_mirror: MirrorFactory, cli: Cli, tmp_path: Path
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image("library/alpine", "latest", [layer(1)])
    mirror = await make_mirror(upstream)
    port = mirror.client.port
    config = tmp_path / "mirror.toml"
    config.write_text(f'[server]\nlisten = "0.0.0.0:{port}"\n')

    status, out, _ = await cli("warm", "alpine", "--config", str(config))

    assert status == 0, out
    await mirror.settle()
    assert files(mirror) == set(image.blobs)


async def test_warm_usage_errors_exit_2(tmp_path: Path, cli: Cli) -> None:
    for argv in (
        ("warm",),
        ("warm", "--file", str(tmp_path / "missing.txt")),
        ("warm", "alpine", "--platform", "linux"),
        ("warm", "alpine", "--mirror", "localhost:5000"),
    ):
        status, _, err = await cli(
            *argv[:1], "--mirror", "http://127.0.0.1:9", *argv[1:]
        )
        assert status == 2, argv
        assert err.startswith("mirror: "), argv


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that warm draws its progress."""

    def isatty(self) -> bool:
        return True


async def test_warm_on_a_terminal_shows_byte_progress(
    make_mirror: MirrorFactory, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeRegistry()
    image = upstream.push_image(
        "library/alpine", "3", [layer(1, 2_000_000), layer(2, 1_000_000)]
    )
    mirror = await make_mirror(upstream)
    total = human_size(size_of(upstream, image))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    status, out, _ = await cli("warm", "alpine:3", "--mirror", mirror_url(mirror))

    assert status == 0
    drawn = terminal.getvalue()
    # The line is redrawn in place: from nothing read to all of it, then ended
    # before the result line goes to stdout.
    assert drawn.startswith(f"\rlibrary/alpine:3 0 B / {total} (0%)\x1b[K")
    assert drawn.endswith(f"\rlibrary/alpine:3 {total} / {total} (100%)\x1b[K\n")
    assert out.startswith("ok      library/alpine:3 ")
    assert "\r" not in out

    # With --json the progress stays on the terminal and stdout is JSON only.
    terminal.seek(0)
    terminal.truncate()
    await mirror.settle()
    status, out, _ = await cli(
        "warm", "alpine:3", "--mirror", mirror_url(mirror), "--json"
    )
    assert status == 0
    assert json.loads(out)["images"][0]["bytes"] == size_of(upstream, image)
    assert f"{total} / {total} (100%)" in terminal.getvalue()


async def test_warm_into_a_pipe_draws_no_progress(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    upstream = FakeRegistry()
    upstream.push_image("library/alpine", "3", [layer(1, 500_000)])
    mirror = await make_mirror(upstream)
    status, out, err = await cli("warm", "alpine:3", "--mirror", mirror_url(mirror))
    assert status == 0
    assert err == ""
    assert out.count("\n") == 2  # the image's line and the summary


async def test_warm_of_an_unreachable_mirror_fails(cli: Cli) -> None:
    status, out, _ = await cli("warm", "alpine", "--mirror", "http://127.0.0.1:9")
    assert status == 1
    assert out.startswith("FAILED  alpine: ClientConnectorError")


# --- several registries ----------------------------------------------------------


async def test_registry_qualified_warm_ls_purge_and_status(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    hub, ghcr = FakeRegistry(), FakeRegistry()
    on_hub = hub.push_image("team/app", "1", [layer(1)])
    on_ghcr = ghcr.push_image("team/app", "1", [layer(2)])
    mirror = await make_mirror(hub, registries={"ghcr.io": ghcr})
    args = ("--cache-dir", cache_dir(mirror))

    status, out, _ = await cli(
        "warm", "ghcr.io/team/app:1", "team/app:1", "--mirror", mirror_url(mirror)
    )
    assert status == 0, out
    assert out.splitlines()[0].startswith("ok      ghcr.io/team/app:1 ")
    assert out.splitlines()[1].startswith("ok      team/app:1 ")
    await mirror.settle()
    assert files(mirror) == set(on_hub.blobs) | set(on_ghcr.blobs)
    assert ghcr.count("blob") == len(on_ghcr.blobs)
    assert hub.count("blob") == len(on_hub.blobs)

    status, listing = await cli_json(cli, "ls", *args)
    assert [(r["registry"], r["repository"]) for r in listing["repositories"]] == [
        ("docker.io", "team/app"),
        ("ghcr.io", "team/app"),
    ]
    status, out, _ = await cli("ls", *args)
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ["team/app", "ghcr.io/team/app"]
    status, listing = await cli_json(cli, "ls", "ghcr.io/team/app", *args)
    assert listing["registry"] == "ghcr.io"
    assert [t["digest"] for t in listing["tags"]] == [on_ghcr.digest]

    status, report = await cli_json(cli, "status", *args)
    assert status == 0
    counts = {
        r["registry"]: (r["repositories"], r["tags"]) for r in report["registries"]
    }
    assert counts == {"docker.io": (1, 1), "ghcr.io": (1, 1)}

    status, report = await cli_json(cli, "purge", "ghcr.io/team/app", *args)
    assert status == 0
    assert report["tags"] == [
        {
            "registry": "ghcr.io",
            "repository": "team/app",
            "tag": "1",
            "digest": on_ghcr.digest,
        }
    ]
    await mirror.settle()
    assert files(mirror) == set(on_hub.blobs)
    assert rows(mirror, "SELECT registry, repository, tag FROM tags") == {
        ("docker.io", "team/app", "1")
    }
    status, _, err = await cli("purge", "quay.io/team/app", *args)
    assert status == 1
    assert "not in the cache" in err


async def test_warm_of_an_unconfigured_registry_reports_name_unknown(
    make_mirror: MirrorFactory, cli: Cli
) -> None:
    mirror = await make_mirror(FakeRegistry())
    status, out, _ = await cli(
        "warm", "quay.io/org/app:1", "--mirror", mirror_url(mirror)
    )
    assert status == 1
    assert "NAME_UNKNOWN" in out or "not mirrored" in out, out
