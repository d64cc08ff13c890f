"""Unit tests for the operator commands' pieces: references, rendering,
progress, and the MetadataStore queries behind status, ls and purge."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror import ops
from mirror.cache.metadata import MetadataStore, PurgeRecord, RegistryCounts
from mirror.cli import build_parser, main
from mirror.config import Address, CacheConfig
from mirror.logutil import human_size
from mirror.warm import (
    Platform,
    default_mirror_url,
    parse_platform,
    read_image_list,
    render_result,
    warm,
)

T0 = 1_700_000_000.0
HUB = "docker.io"
GHCR = "ghcr.io"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def digest(name: str) -> str:
    return "sha256:" + name.encode().hex().ljust(64, "0")[:64]


def image_body(config: str, *layers: str, size: int = 10) -> bytes:
    return json.dumps(
        {
            "config": {"digest": digest(config), "size": size},
            "layers": [{"digest": digest(x), "size": size} for x in layers],
        }
    ).encode()


def index_body(*children: str) -> bytes:
    return json.dumps(
        {"manifests": [{"digest": digest(c), "size": 100} for c in children]}
    ).encode()


# --- references ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ops.ImageRef("library/alpine")),
        ("alpine:3", ops.ImageRef("library/alpine", "3")),
        ("docker.io/library/alpine:3", ops.ImageRef("library/alpine", "3")),
        ("index.docker.io/grafana/grafana", ops.ImageRef("grafana/grafana")),
        ("grafana/grafana:10.2", ops.ImageRef("grafana/grafana", "10.2")),
        (
            f"user/app@sha256:{'a' * 64}",
            ops.ImageRef("user/app", None, f"sha256:{'a' * 64}"),
        ),
        (
            f"user/app:1@sha256:{'a' * 64}",
            ops.ImageRef("user/app", "1", f"sha256:{'a' * 64}"),
        ),
        # Docker Hub under any of its names; library/ is docker.io's alone.
        ("registry-1.docker.io/alpine", ops.ImageRef("library/alpine")),
        ("Docker.IO/alpine:3", ops.ImageRef("library/alpine", "3")),
        # Docker's rule: no `.`, no `:` and not localhost is no host.
        ("localhost:5000", ops.ImageRef("library/localhost", "5000")),
        # Other registries: the host is lower-cased, the name kept as given.
        ("ghcr.io/owner/app:1", ops.ImageRef("owner/app", "1", registry=GHCR)),
        ("GHCR.io/owner/app", ops.ImageRef("owner/app", registry=GHCR)),
        ("quay.io/org/app", ops.ImageRef("org/app", registry="quay.io")),
        ("quay.io/app", ops.ImageRef("app", registry="quay.io")),
        (
            f"registry.corp:5000/team/app@sha256:{'a' * 64}",
            ops.ImageRef("team/app", None, f"sha256:{'a' * 64}", "registry.corp:5000"),
        ),
        (
            f"ghcr.io/owner/app:1@sha256:{'a' * 64}",
            ops.ImageRef("owner/app", "1", f"sha256:{'a' * 64}", GHCR),
        ),
        ("localhost:5000/app", ops.ImageRef("app", registry="localhost:5000")),
        ("localhost/team/app:2", ops.ImageRef("team/app", "2", registry="localhost")),
        ("10.0.0.7:5000/a/b", ops.ImageRef("a/b", registry="10.0.0.7:5000")),
        ("[fd00::7]:5000/a", ops.ImageRef("a", registry="[fd00::7]:5000")),
        ("gcr.io/a/b/c:v1.2", ops.ImageRef("a/b/c", "v1.2", registry="gcr.io")),
    ],
)
def test_parse_image_ref(text: str, expected: ops.ImageRef) -> None:
    ref = ops.parse_image_ref(text)
    assert ref == expected
    # What str() shows reads back as the same reference.
    assert ops.parse_image_ref(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "shown", "name"),
    [
        ("alpine:3", "library/alpine:3", "library/alpine"),
        ("docker.io/grafana/grafana", "grafana/grafana", "grafana/grafana"),
        ("GHCR.IO/owner/app:1", "ghcr.io/owner/app:1", "ghcr.io/owner/app"),
        ("quay.io/app", "quay.io/app", "quay.io/app"),
        (
            f"registry.corp:5000/t/a@sha256:{'c' * 64}",
            f"registry.corp:5000/t/a@sha256:{'c' * 64}",
            "registry.corp:5000/t/a",
        ),
    ],
)
def test_image_refs_show_docker_io_bare_and_others_qualified(
    text: str, shown: str, name: str
) -> None:
    ref = ops.parse_image_ref(text)
    assert str(ref) == shown
    assert ref.name == name
    assert ops.qualified_name(ref.registry, ref.repository) == name


def test_image_ref_default_tag_and_reference() -> None:
    ref = ops.parse_image_ref("alpine", default_tag="latest")
    assert ref.reference == "latest"
    assert str(ref) == "library/alpine:latest"
    pinned = ops.parse_image_ref(f"alpine@sha256:{'b' * 64}", default_tag="latest")
    assert pinned.reference == f"sha256:{'b' * 64}"


@pytest.mark.parametrize(
    "text",
    [
        "Alpine",
        "alpine:",
        "alpine:-x",
        "alpine@sha256:abc",
        "a//b",
        "docker.io/",
        "ghcr.io/",  # a host and nothing after
        "ghcr.io/:1",
        "Ghcr.io/Owner/app",  # the host may be any case, the name may not
        "ghcr.io/owner/App",
        "ghcr.io/owner//app",
        "ghcr.io/owner/app:",
        "ghcr.io/owner/app@sha256:abc",
        "quay.io/" + "a" * 256,  # longer than a name may be
        "ghcr..io/app",  # not a host name
        "ghcr.io:/app",
        "-ghcr.io/app",
        "ghcr.io:5000x/app",
    ],
)
def test_bad_image_refs_are_usage_errors(text: str) -> None:
    with pytest.raises(ops.UsageError) as info:
        ops.parse_image_ref(text)
    assert info.value.exit_status == 2
    assert repr(text) in str(info.value)


def test_other_registries_names_are_checked_by_the_same_grammar() -> None:
    # Without library/, a single component of a registry's full length is fine.
    longest = "a" * 255
    assert ops.parse_image_ref(f"quay.io/{longest}").repository == longest
    with pytest.raises(ops.UsageError, match="invalid repository name"):
        ops.parse_image_ref("quay.io/a__-b")


def test_platforms() -> None:
    assert parse_platform("linux/arm/v7") == Platform("linux", "arm", "v7")
    amd = parse_platform("linux/amd64")
    assert str(amd) == "linux/amd64"
    assert amd.matches({"os": "linux", "architecture": "amd64", "variant": "v2"})
    assert not amd.matches({"os": "linux", "architecture": "arm64"})
    assert not Platform("linux", "arm", "v7").matches(
        {"os": "linux", "architecture": "arm", "variant": "v6"}
    )
    assert not amd.matches(None)
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(ops.UsageError):
            parse_platform(bad)


def test_image_list_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text("# header\n alpine:3 \n\ngrafana/grafana # trailing\n#x\n")
    assert read_image_list(path) == ["alpine:3", "grafana/grafana"]
    with pytest.raises(ops.UsageError):
        read_image_list(tmp_path / "missing")


def test_default_mirror_url_reaches_a_wildcard_listener_locally() -> None:
    assert default_mirror_url(Address("0.0.0.0", 5000)) == "http://127.0.0.1:5000"  # noqa: S104
    assert default_mirror_url(Address("::", 5000)) == "http://[::1]:5000"
    assert default_mirror_url(Address("mirror.lan", 80)) == "http://mirror.lan:80"


def test_every_operator_command_is_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    (commands,) = (
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    for name in commands:
        if name != "serve":
            assert f"### `mirror {name}" in text, name


# --- rendering -----------------------------------------------------------------


def test_human_units() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(50 * 1024**3) == "50.0 GiB"
    assert human_size(3 * 1024**5) == "3072.0 TiB"
    assert ops.human_age(5) == "just now"
    assert ops.human_age(90) == "1m ago"
    assert ops.human_age(3 * 86400 + 5) == "3d ago"
    assert ops.human_time(None, T0) == "-"
    assert ops.human_time(T0 - 7200, T0).endswith(" (2h ago)")


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    text = ops.table(("NAME", "N"), [("a", "1"), ("longer", "100")], right=1)
    assert text.splitlines() == ["NAME      N", "a         1", "longer  100"]


def test_to_json_turns_dataclasses_and_tuples_into_json() -> None:
    record = PurgeRecord(
        tags=[("g", "r", "t", "d")], links=[], manifests=[], blobs=[("b", 1)]
    )
    assert json.loads(ops.to_json({"x": record})) == {
        "x": {
            "tags": [["g", "r", "t", "d"]],
            "links": [],
            "manifests": [],
            "blobs": [["b", 1]],
        }
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = ops.Progress(stream, tty=True, clock=clock)
    update = progress.verify_callback()
    update(1, 3, 10, 30)
    update(2, 3, 20, 30)  # too soon: skipped
    clock.now = 1.0
    update(3, 3, 30, 30)
    progress.finish()
    assert stream.getvalue() == (
        "\rverifying: 1/3 blobs, 10 B of 30 B (33%)\x1b[K"
        "\rverifying: 3/3 blobs, 30 B of 30 B (100%)\x1b[K\n"
    )


def test_progress_elsewhere_prints_a_line_per_interval_and_the_last() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = ops.Progress(stream, tty=False, interval=10, clock=clock)
    update = progress.verify_callback()
    for done, now in enumerate((0.0, 5.0, 11.0, 12.0), start=1):
        clock.now = now
        update(done, 4, done, 4)
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "verifying: 1/4 blobs, 1 B of 4 B (25%)",
        "verifying: 3/4 blobs, 3 B of 4 B (75%)",
        "verifying: 4/4 blobs, 4 B of 4 B (100%)",
    ]


# --- MetadataStore: status, ls, purge --------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MetadataStore]:
    meta = MetadataStore(tmp_path / "mirror.db")
    await meta.open()
    try:
        yield meta
    finally:
        await meta.close()


async def put_image(
    store: MetadataStore,
    repo: str,
    name: str,
    *blobs: str,
    now: float = T0,
    registry: str = HUB,
) -> str:
    """A manifest `name` whose config is blobs[0]; blobs are stored too."""
    await store.put_manifest(
        registry, repo, digest(name), MANIFEST, image_body(*blobs), now
    )
    for blob in blobs:
        await store.add_blob(digest(blob), 10, now)
    return digest(name)


async def put_index(
    store: MetadataStore,
    repo: str,
    name: str,
    *children: str,
    now: float = T0,
    registry: str = HUB,
) -> str:
    await store.put_manifest(
        registry, repo, digest(name), INDEX, index_body(*children), now
    )
    return digest(name)


def blob_names(record: PurgeRecord) -> set[str]:
    return {d for d, _n in record.blobs}


async def test_cache_stats(store: MetadataStore) -> None:
    empty = await store.cache_stats()
    assert (empty.blobs, empty.blob_bytes, empty.oldest_access) == (0, 0, None)
    await put_image(store, "library/a", "m1", "c1", "l1", now=T0)
    await put_image(store, "library/b", "m2", "c2", now=T0 + 5)
    await store.put_tag(HUB, "library/a", "1", digest("m1"), MANIFEST, 1, T0)
    stats = await store.cache_stats()
    assert (stats.blobs, stats.blob_bytes) == (3, 30)
    assert (stats.oldest_access, stats.newest_access) == (T0, T0 + 5)
    assert (stats.manifests, stats.tags, stats.repositories) == (2, 1, 2)


async def test_tags_list_sizes_platforms_and_unfetched_manifests(
    store: MetadataStore,
) -> None:
    await put_image(store, "library/a", "amd", "c1", "shared")
    await store.add_blob(digest("shared"), 10, T0)
    index = await put_index(store, "library/a", "idx", "amd", "arm")  # arm unknown
    await store.put_tag(HUB, "library/a", "3", index, INDEX, 1, T0)
    await store.put_tag(
        HUB, "library/a", "head-only", digest("nowhere"), MANIFEST, 1, T0
    )
    tags = {t.tag: t for t in await store.repository_tags(HUB, "library/a")}
    assert tags["3"].platforms == (1, 2)
    assert (tags["3"].size, tags["3"].cached, tags["3"].blobs) == (20, 20, 2)
    assert tags["3"].manifest_cached
    assert not tags["head-only"].manifest_cached
    assert tags["head-only"].size == 0
    assert await store.repository_tags(HUB, "library/none") == []


async def test_purge_repository_keeps_manifests_other_repositories_link(
    store: MetadataStore,
) -> None:
    shared = await put_image(store, "library/a", "m", "c", "l")
    await store.put_manifest(HUB, "team/b", shared, MANIFEST, image_body("c", "l"), T0)
    await store.put_tag(HUB, "library/a", "1", shared, MANIFEST, 1, T0)
    record = await store.purge_repository(HUB, "library/a")
    assert record.tags == [(HUB, "library/a", "1", shared)]
    assert record.links == [(HUB, "library/a", shared)]
    assert record.manifests == []
    assert record.blobs == []
    assert await store.get_manifest(shared) is not None


async def test_purge_follows_nested_indexes_and_survives_cycles(
    store: MetadataStore,
) -> None:
    await put_image(store, "library/a", "leaf", "c", "l")
    inner = await put_index(store, "library/a", "inner", "leaf", "outer")
    outer = await put_index(store, "library/a", "outer", "inner")  # a cycle
    await store.put_tag(HUB, "library/a", "x", outer, INDEX, 1, T0)
    # Another repository links only the leaf: it and its blobs stay.
    await store.put_manifest(
        HUB, "team/b", digest("leaf"), MANIFEST, image_body("c", "l"), T0
    )
    record = await store.purge_repository(HUB, "library/a", "x")
    assert {d for d, _t, _n in record.manifests} == {inner, outer}
    assert record.blobs == []
    assert {d for _g, _r, d in record.links} == {inner, outer, digest("leaf")}
    record = await store.purge_repository(HUB, "team/b")
    assert [d for d, _t, _n in record.manifests] == [digest("leaf")]
    assert blob_names(record) == {digest("c"), digest("l")}


async def test_purge_leaves_blobs_no_manifest_ever_referenced(
    store: MetadataStore,
) -> None:
    await put_image(store, "library/a", "m", "c")
    await store.add_blob(digest("loose"), 10, T0)
    record = await store.purge_repository(HUB, "library/a")
    assert blob_names(record) == {digest("c")}
    assert set(await store.all_blobs()) == {digest("loose")}


async def test_purge_dry_run_and_before_commit(
    store: MetadataStore, tmp_path: Path
) -> None:
    await put_image(store, "library/a", "m", "c", "l")
    dry = await store.purge_repository(HUB, "library/a", dry_run=True)
    assert blob_names(dry) == {digest("c"), digest("l")}
    assert len(await store.all_blobs()) == 2

    def refuse(digests: list[str]) -> None:
        raise OSError("disk says no")

    with pytest.raises(OSError, match="disk says no"):
        await store.purge_repository(HUB, "library/a", before_commit=refuse)
    assert len(await store.all_blobs()) == 2  # rolled back

    seen: list[list[str]] = []

    def detach(digests: list[str]) -> None:
        # Inside the transaction: another connection still sees the rows.
        with closing(sqlite3.connect(tmp_path / "mirror.db")) as conn:
            assert conn.execute("SELECT count(*) FROM blobs").fetchone() == (2,)
        seen.append(digests)

    real = await store.purge_repository(HUB, "library/a", before_commit=detach)
    assert real == dry
    assert seen == [sorted([digest("c"), digest("l")])]
    assert await store.all_blobs() == {}


async def test_purge_older_than(store: MetadataStore) -> None:
    old = await put_image(store, "library/old", "old", "c-old", "shared", now=T0)
    new = await put_image(store, "library/new", "new", "c-new", "shared", now=T0)
    await store.put_tag(HUB, "library/old", "1", old, MANIFEST, 1, T0)
    await store.put_tag(HUB, "library/new", "1", new, MANIFEST, 1, T0)
    later = T0 + 100
    store.touch_tag(HUB, "library/new", "1", later)
    store.touch_manifest(new, later)
    for blob in ("c-new", "shared"):
        store.touch_blob(digest(blob), later)
    record = await store.purge_older_than(T0 + 50)
    assert record.tags == [(HUB, "library/old", "1", old)]
    assert record.links == [(HUB, "library/old", old)]
    assert [d for d, _t, _n in record.manifests] == [old]
    assert blob_names(record) == {digest("c-old")}
    assert set(await store.all_blobs()) == {digest("c-new"), digest("shared")}


# --- several registries: status, ls, purge ---------------------------------------

QUAY = "quay.io"


async def fill_registries(store: MetadataStore) -> dict[str, str]:
    """team/app:1 on docker.io and on ghcr.io (sharing a layer), app:2 on
    quay.io (no library/ there), library/alpine:3 on docker.io."""
    images = {
        "hub": await put_image(store, "team/app", "m-hub", "c-hub", "shared"),
        "ghcr": await put_image(
            store, "team/app", "m-ghcr", "c-ghcr", "shared", registry=GHCR
        ),
        "quay": await put_image(store, "app", "m-quay", "c-quay", registry=QUAY),
        "alpine": await put_image(store, "library/alpine", "m-alpine", "c-alpine"),
    }
    for registry, repo, tag, image in [
        (HUB, "team/app", "1", "hub"),
        (GHCR, "team/app", "1", "ghcr"),
        (QUAY, "app", "2", "quay"),
        (HUB, "library/alpine", "3", "alpine"),
    ]:
        await store.put_tag(registry, repo, tag, images[image], MANIFEST, 1, T0)
    return images


async def test_repositories_are_listed_docker_io_first_then_by_host(
    store: MetadataStore,
) -> None:
    for registry in ("registry.corp:5000", QUAY, GHCR, "localhost:5000", HUB):
        await store.put_tag(registry, "z/app", "1", digest("m"), MANIFEST, 1, T0)
    await store.put_tag(HUB, "a/app", "1", digest("m"), MANIFEST, 1, T0)
    names = [(r.registry, r.repository) for r in await store.repositories()]
    assert names == [
        (HUB, "a/app"),
        (HUB, "z/app"),
        (GHCR, "z/app"),
        ("localhost:5000", "z/app"),
        (QUAY, "z/app"),
        ("registry.corp:5000", "z/app"),
    ]


async def test_stats_and_sizes_are_per_registry(store: MetadataStore) -> None:
    images = await fill_registries(store)
    await store.put_manifest(GHCR, "other/lib", images["ghcr"], MANIFEST, b"{}", T0)
    stats = await store.cache_stats()
    assert (stats.tags, stats.repositories) == (4, 5)  # team/app counts twice
    assert stats.registries == [
        RegistryCounts(HUB, repositories=2, tags=2),
        RegistryCounts(GHCR, repositories=2, tags=1),
        RegistryCounts(QUAY, repositories=1, tags=1),
    ]
    repos = {(r.registry, r.repository): r for r in await store.repositories()}
    assert (repos[HUB, "team/app"].blobs, repos[GHCR, "team/app"].blobs) == (2, 2)
    assert repos[GHCR, "other/lib"].tags == 0
    assert repos[GHCR, "other/lib"].manifests == 1
    (tag,) = await store.repository_tags(GHCR, "team/app")
    assert (tag.registry, tag.repository, tag.digest) == (
        GHCR,
        "team/app",
        images["ghcr"],
    )
    assert await store.repository_tags(QUAY, "library/app") == []


async def test_status_breaks_counts_down_by_registry(
    store: MetadataStore, tmp_path: Path
) -> None:
    await fill_registries(store)
    status = await ops.status(CacheConfig(dir=tmp_path))
    assert (status.tags, status.repositories) == (4, 4)
    assert json.loads(ops.to_json(status))["registries"] == [
        {"registry": HUB, "repositories": 2, "tags": 2},
        {"registry": GHCR, "repositories": 1, "tags": 1},
        {"registry": QUAY, "repositories": 1, "tags": 1},
    ]
    lines = [line.split() for line in ops.render_status(status, T0).splitlines()]
    at = lines.index(["tags", "4", "in", "4", "repositories"])
    assert lines[at + 1 : at + 4] == [
        [HUB, "2", "in", "2", "repositories"],
        [GHCR, "1", "in", "1", "repositories"],
        [QUAY, "1", "in", "1", "repositories"],
    ]
    assert lines[at + 4][0] == "oldest"


async def test_ls_shows_registry_qualified_names(
    store: MetadataStore, tmp_path: Path
) -> None:
    images = await fill_registries(store)
    cache = CacheConfig(dir=tmp_path)
    repos = await ops.list_repositories(cache)
    text = ops.render_repositories(repos, T0).splitlines()
    assert [line.split()[0] for line in text[1:]] == [
        "library/alpine",
        "team/app",
        "ghcr.io/team/app",
        "quay.io/app",
    ]
    listed = json.loads(ops.to_json({"repositories": repos}))["repositories"]
    assert [(r["registry"], r["repository"]) for r in listed] == [
        (HUB, "library/alpine"),
        (HUB, "team/app"),
        (GHCR, "team/app"),
        (QUAY, "app"),
    ]

    ref = ops.parse_image_ref("ghcr.io/team/app")
    (tag,) = await ops.list_tags(cache, ref.registry, ref.repository)
    assert (tag.registry, tag.tag, tag.digest) == (GHCR, "1", images["ghcr"])
    assert ops.render_tags(ref.name, [tag], T0).splitlines()[0] == "ghcr.io/team/app"
    (tag,) = await ops.list_tags(cache, HUB, "team/app")
    assert tag.digest == images["hub"]
    with pytest.raises(ops.NotInCache, match=r"^quay\.io/team/app is not in"):
        await ops.list_tags(cache, QUAY, "team/app")
    with pytest.raises(ops.NotInCache, match=r"^library/app is not in"):
        await ops.list_tags(cache, HUB, "library/app")


async def test_purge_of_one_registry_leaves_the_same_path_elsewhere(
    store: MetadataStore, tmp_path: Path
) -> None:
    images = await fill_registries(store)
    cache = CacheConfig(dir=tmp_path)

    report = await ops.purge(cache, image=ops.parse_image_ref("ghcr.io/team/app"))

    assert report.record.tags == [(GHCR, "team/app", "1", images["ghcr"])]
    assert report.record.links == [(GHCR, "team/app", images["ghcr"])]
    assert [d for d, _t, _n in report.record.manifests] == [images["ghcr"]]
    # The layer docker.io's team/app shares stays.
    assert blob_names(report.record) == {digest("c-ghcr")}
    assert await store.get_tag(HUB, "team/app", "1") is not None
    assert await store.get_manifest(images["hub"]) is not None
    assert await store.get_tag(GHCR, "team/app", "1") is None
    assert report.as_json()["tags"] == [
        {
            "registry": GHCR,
            "repository": "team/app",
            "tag": "1",
            "digest": images["ghcr"],
        }
    ]
    assert report.as_json()["links"] == [
        {"registry": GHCR, "repository": "team/app", "digest": images["ghcr"]}
    ]
    text = ops.render_purge(report).splitlines()
    assert (
        text[0]
        == f"removed tag ghcr.io/team/app:1 ({ops.short_digest(images['ghcr'])})"
    )
    assert (
        text[1] == f"removed link ghcr.io/team/app@{ops.short_digest(images['ghcr'])}"
    )

    with pytest.raises(ops.NotInCache, match=r"^ghcr\.io/team/app:1 is not in"):
        await ops.purge(cache, image=ops.parse_image_ref("ghcr.io/team/app:1"))
    report = await ops.purge(cache, image=ops.parse_image_ref("team/app:1"))
    assert report.record.tags == [(HUB, "team/app", "1", images["hub"])]
    assert (
        ops.render_purge(report).splitlines()[0].startswith("removed tag team/app:1 (")
    )
    assert await store.get_tag(QUAY, "app", "2") is not None


async def cli(*argv: str) -> tuple[int, str, str]:
    """`mirror ARGS...` in a thread (its own event loop): (status, out, err)."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    status = await asyncio.to_thread(run)
    return status, out.getvalue(), err.getvalue()


async def test_cli_ls_and_purge_take_qualified_references(
    store: MetadataStore, tmp_path: Path
) -> None:
    images = await fill_registries(store)
    where = ("--cache-dir", str(tmp_path))

    status, out, _ = await cli("ls", "ghcr.io/team/app", *where, "--json")
    assert status == 0
    listing = json.loads(out)
    assert (listing["registry"], listing["repository"]) == (GHCR, "team/app")
    assert [t["digest"] for t in listing["tags"]] == [images["ghcr"]]
    status, out, _ = await cli("ls", "quay.io/app", *where)
    assert (status, out.splitlines()[0]) == (0, "quay.io/app")
    status, out, _ = await cli("ls", *where)
    assert "ghcr.io/team/app" in out.split()
    status, _, err = await cli("ls", "quay.io/team/app", *where)
    assert (status, err) == (1, "mirror: quay.io/team/app is not in the cache\n")
    status, _, err = await cli("ls", "ghcr.io/team/app:1", *where)
    assert status == 2

    status, out, _ = await cli("purge", "ghcr.io/team/app:1", *where, "--json")
    assert status == 0
    assert json.loads(out)["tags"] == [
        {
            "registry": GHCR,
            "repository": "team/app",
            "tag": "1",
            "digest": images["ghcr"],
        }
    ]
    status, out, _ = await cli("status", *where, "--json")
    assert status == 0
    assert [(r["registry"], r["tags"]) for r in json.loads(out)["registries"]] == [
        (HUB, 2),
        (QUAY, 1),
    ]


# --- warm: ?ns= for registries other than docker.io -------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_warm_names_other_registries_with_ns(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    """A stand-in for the mirror: it routes on `ns` as the mirror does and
    knows docker.io and ghcr.io only."""
    content: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    for registry in (HUB, GHCR):
        config, layer = f"config {registry}".encode(), f"layer {registry}".encode()
        manifest = json.dumps(
            {
                "config": {"digest": sha(config), "size": len(config)},
                "layers": [{"digest": sha(layer), "size": len(layer)}],
            }
        ).encode()
        content[registry] = (manifest, {sha(config): config, sha(layer): layer})
    seen: list[tuple[str, str | None]] = []

    async def handle(request: web.Request) -> web.Response:
        ns = request.query.get("ns")
        seen.append((request.path, ns))
        if (ns or HUB) not in content:
            error = {"code": "NAME_UNKNOWN", "message": f"{ns} is not configured"}
            return web.json_response({"errors": [error]}, status=404)
        manifest, blobs = content[ns or HUB]
        if "/manifests/" in request.path:
            return web.Response(
                body=manifest,
                content_type=MANIFEST,
                headers={"Docker-Content-Digest": sha(manifest)},
            )
        return web.Response(body=blobs[request.path.rsplit("/", 1)[1]])

    app = web.Application()
    app.router.add_get("/v2/{tail:.+}", handle)
    server = await aiohttp_server(app)

    results = await warm(
        str(server.make_url("")),
        ["ghcr.io/team/app:1", "team/app:1", "registry.corp:5000/team/app"],
    )

    ghcr, hub, corp = results
    assert (ghcr.ok, ghcr.registry, ghcr.repository) == (True, GHCR, "team/app")
    assert ghcr.name == "ghcr.io/team/app:1"
    assert ghcr.digest == sha(content[GHCR][0])
    assert hub.ok
    assert (hub.name, hub.digest) == ("team/app:1", sha(content[HUB][0]))
    assert hub.bytes == sum(map(len, content[HUB][1].values()))
    assert render_result(corp) == (
        "FAILED  registry.corp:5000/team/app: manifest "
        "registry.corp:5000/team/app:latest: 404 NAME_UNKNOWN: "
        "registry.corp:5000 is not configured"
    )
    assert json.loads(ops.to_json(ghcr))["registry"] == GHCR
    assert {ns for path, ns in seen if "/team/app/" in path} == {
        GHCR,
        None,
        "registry.corp:5000",
    }
    assert sorted(seen[:3]) == sorted(
        [("/v2/team/app/manifests/1", GHCR)]
        + [(f"/v2/team/app/blobs/{d}", GHCR) for d in content[GHCR][1]]
    )
    assert sorted(seen[3:6]) == sorted(
        [("/v2/team/app/manifests/1", None)]
        + [(f"/v2/team/app/blobs/{d}", None) for d in content[HUB][1]]
    )
    assert seen[6:] == [("/v2/team/app/manifests/latest", "registry.corp:5000")]
