"""Unit tests for the operator commands' pieces: references, rendering,
progress, and the MetadataStore queries behind status, ls and purge."""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from mirror import ops
from mirror.cache.metadata import MetadataStore, PurgeRecord
from mirror.cli import build_parser
from mirror.config import Address
from mirror.warm import Platform, default_mirror_url, parse_platform, read_image_list

T0 = 1_700_000_000.0
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
    ],
)
def test_parse_image_ref(text: str, expected: ops.ImageRef) -> None:
    assert ops.parse_image_ref(text) == expected


def test_image_ref_default_tag_and_reference() -> None:
    ref = ops.parse_image_ref("alpine", default_tag="latest")
    assert ref.reference == "latest"
    assert str(ref) == "library/alpine:latest"
    pinned = ops.parse_image_ref(f"alpine@sha256:{'b' * 64}", default_tag="latest")
    assert pinned.reference == f"sha256:{'b' * 64}"


@pytest.mark.parametrize(
    "text",
    ["Alpine", "alpine:", "alpine:-x", "alpine@sha256:abc", "quay.io/a/b", "a//b"],
)
def test_bad_image_refs_are_usage_errors(text: str) -> None:
    with pytest.raises(ops.UsageError) as info:
        ops.parse_image_ref(text)
    assert info.value.exit_status == 2


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
    assert ops.human_size(0) == "0 B"
    assert ops.human_size(1023) == "1023 B"
    assert ops.human_size(1536) == "1.5 KiB"
    assert ops.human_size(50 * 1024**3) == "50.0 GiB"
    assert ops.human_size(3 * 1024**5) == "3072.0 TiB"
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
        tags=[("r", "t", "d")], links=[], manifests=[], blobs=[("b", 1)]
    )
    assert json.loads(ops.to_json({"x": record})) == {
        "x": {
            "tags": [["r", "t", "d"]],
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
    store: MetadataStore, repo: str, name: str, *blobs: str, now: float = T0
) -> str:
    """A manifest `name` whose config is blobs[0]; blobs are stored too."""
    await store.put_manifest(repo, digest(name), MANIFEST, image_body(*blobs), now)
    for blob in blobs:
        await store.add_blob(digest(blob), 10, now)
    return digest(name)


async def put_index(
    store: MetadataStore, repo: str, name: str, *children: str, now: float = T0
) -> str:
    await store.put_manifest(repo, digest(name), INDEX, index_body(*children), now)
    return digest(name)


def blob_names(record: PurgeRecord) -> set[str]:
    return {d for d, _n in record.blobs}


async def test_cache_stats(store: MetadataStore) -> None:
    empty = await store.cache_stats()
    assert (empty.blobs, empty.blob_bytes, empty.oldest_access) == (0, 0, None)
    await put_image(store, "library/a", "m1", "c1", "l1", now=T0)
    await put_image(store, "library/b", "m2", "c2", now=T0 + 5)
    await store.put_tag("library/a", "1", digest("m1"), MANIFEST, 1, T0)
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
    await store.put_tag("library/a", "3", index, INDEX, 1, T0)
    await store.put_tag("library/a", "head-only", digest("nowhere"), MANIFEST, 1, T0)
    tags = {t.tag: t for t in await store.repository_tags("library/a")}
    assert tags["3"].platforms == (1, 2)
    assert (tags["3"].size, tags["3"].cached, tags["3"].blobs) == (20, 20, 2)
    assert tags["3"].manifest_cached
    assert not tags["head-only"].manifest_cached
    assert tags["head-only"].size == 0
    assert await store.repository_tags("library/none") == []


async def test_purge_repository_keeps_manifests_other_repositories_link(
    store: MetadataStore,
) -> None:
    shared = await put_image(store, "library/a", "m", "c", "l")
    await store.put_manifest("team/b", shared, MANIFEST, image_body("c", "l"), T0)
    await store.put_tag("library/a", "1", shared, MANIFEST, 1, T0)
    record = await store.purge_repository("library/a")
    assert record.tags == [("library/a", "1", shared)]
    assert record.links == [("library/a", shared)]
    assert record.manifests == []
    assert record.blobs == []
    assert await store.get_manifest(shared) is not None


async def test_purge_follows_nested_indexes_and_survives_cycles(
    store: MetadataStore,
) -> None:
    await put_image(store, "library/a", "leaf", "c", "l")
    inner = await put_index(store, "library/a", "inner", "leaf", "outer")
    outer = await put_index(store, "library/a", "outer", "inner")  # a cycle
    await store.put_tag("library/a", "x", outer, INDEX, 1, T0)
    # Another repository links only the leaf: it and its blobs stay.
    await store.put_manifest(
        "team/b", digest("leaf"), MANIFEST, image_body("c", "l"), T0
    )
    record = await store.purge_repository("library/a", "x")
    assert {d for d, _t, _n in record.manifests} == {inner, outer}
    assert record.blobs == []
    assert {d for _r, d in record.links} == {inner, outer, digest("leaf")}
    record = await store.purge_repository("team/b")
    assert [d for d, _t, _n in record.manifests] == [digest("leaf")]
    assert blob_names(record) == {digest("c"), digest("l")}


async def test_purge_leaves_blobs_no_manifest_ever_referenced(
    store: MetadataStore,
) -> None:
    await put_image(store, "library/a", "m", "c")
    await store.add_blob(digest("loose"), 10, T0)
    record = await store.purge_repository("library/a")
    assert blob_names(record) == {digest("c")}
    assert set(await store.all_blobs()) == {digest("loose")}


async def test_purge_dry_run_and_before_commit(
    store: MetadataStore, tmp_path: Path
) -> None:
    await put_image(store, "library/a", "m", "c", "l")
    dry = await store.purge_repository("library/a", dry_run=True)
    assert blob_names(dry) == {digest("c"), digest("l")}
    assert len(await store.all_blobs()) == 2

    def refuse(digests: list[str]) -> None:
        raise OSError("disk says no")

    with pytest.raises(OSError, match="disk says no"):
        await store.purge_repository("library/a", before_commit=refuse)
    assert len(await store.all_blobs()) == 2  # rolled back

    seen: list[list[str]] = []

    def detach(digests: list[str]) -> None:
        # Inside the transaction: another connection still sees the rows.
        with closing(sqlite3.connect(tmp_path / "mirror.db")) as conn:
            assert conn.execute("SELECT count(*) FROM blobs").fetchone() == (2,)
        seen.append(digests)

    real = await store.purge_repository("library/a", before_commit=detach)
    assert real == dry
    assert seen == [sorted([digest("c"), digest("l")])]
    assert await store.all_blobs() == {}


async def test_purge_older_than(store: MetadataStore) -> None:
    old = await put_image(store, "library/old", "old", "c-old", "shared", now=T0)
    new = await put_image(store, "library/new", "new", "c-new", "shared", now=T0)
    await store.put_tag("library/old", "1", old, MANIFEST, 1, T0)
    await store.put_tag("library/new", "1", new, MANIFEST, 1, T0)
    later = T0 + 100
    store.touch_tag("library/new", "1", later)
    store.touch_manifest(new, later)
    for blob in ("c-new", "shared"):
        store.touch_blob(digest(blob), later)
    record = await store.purge_older_than(T0 + 50)
    assert record.tags == [("library/old", "1", old)]
    assert record.links == [("library/old", old)]
    assert [d for d, _t, _n in record.manifests] == [old]
    assert blob_names(record) == {digest("c-old")}
    assert set(await store.all_blobs()) == {digest("c-new"), digest("shared")}
