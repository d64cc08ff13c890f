"""Three mirror nodes behind real HAProxy, sharded by the shipped config.

The distribution registry is the upstream, three ``python -m mirror serve``
processes each have their own cache directory, and HAProxy runs
``deploy/haproxy/haproxy.cfg`` with only its ports and server lines changed
(``HaproxyProcess``). Clients are aiohttp GETs of the manifest and every
blob, verifying each blob's sha256, the way a pull does. What the tests
prove, counting from the registry's own request log, HAProxy's access log
(which node took which key) and the nodes' cache directories:

* a 20-client herd makes one upstream GET per distinct blob, no blob is
  stored on two nodes, and the blobs are spread over the nodes;
* ``kill -9`` of a node while its blobs stream: every client still ends
  with verified bytes (retrying, as dockerd and containerd do), and only
  that node's keys move: the other nodes' blobs are fetched once;
* restarted on the same cache dir and port, the node gets its keys back
  and fetches again only the blobs it had not finished; the tag is
  revalidated on one node.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.network import Link

from .cache_dir import CacheDir
from .conftest import Published, Publisher, start_or_fail, unique, watch_log
from .haproxy import HAPROXY_PATH, HaproxyProcess, Routed, Server
from .mirror_process import MirrorProcess
from .test_lifecycle import samples
from .tools import require_tool
from .upstream import Upstream

KiB = 1024
MiB = 1024 * KiB
NODES = 3
CLIENTS = 20
# Mixed sizes: behind the slow link the small layers are cached within a
# fraction of a second while the big ones still stream, so a node can be
# killed holding both finished and unfinished blobs. Ten layers and a
# config: enough keys for the ring to spread them over the nodes.
LAYER_SIZES = [
    64 * KiB,
    128 * KiB,
    256 * KiB,
    512 * KiB,
    768 * KiB,
    1 * MiB,
    2 * MiB,
    3 * MiB,
    4 * MiB,
    4 * MiB,
]
# Bytes per second per upstream connection: a 4 MiB layer takes 4 s.
SLOW_RATE = 1 * MiB
# Short, so the second herd finds every tag due for revalidation.
NODE_TOML = 'tag_ttl = "2s"\nmin_free = "1MiB"\n'
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json"
)
# A client's patience with one GET: a few tries, a short pause between.
ATTEMPTS = 6
PAUSE = 0.5
HERD_LIMIT = 120.0


# --- the cluster ----------------------------------------------------------------


@dataclass
class Node:
    """A mirror node with a stable name (its ring id) and cache directory."""

    name: str
    mirror: MirrorProcess

    @property
    def cache(self) -> CacheDir:
        return CacheDir(self.mirror.cache_dir)

    def blobs(self) -> set[str]:
        return set(self.cache.blob_files())

    def kill9(self) -> None:
        """SIGKILL the node and reap it: a crash at this very moment."""
        assert self.mirror.process is not None
        popen = self.mirror.process.popen
        assert popen is not None
        popen.kill()
        popen.wait(timeout=10)

    def restart(self, *, timeout: float = 30.0) -> None:
        """Start the node again: same port, same cache dir, so HAProxy's
        server line finds it where it was."""
        self.mirror.restart(timeout=timeout)


@dataclass
class Cluster:
    nodes: list[Node]
    haproxy: HaproxyProcess

    def holders(self) -> dict[str, set[str]]:
        """Digest -> names of the nodes whose blob store holds it."""
        found: dict[str, set[str]] = {}
        for node in self.nodes:
            for digest in node.blobs():
                found.setdefault(digest, set()).add(node.name)
        return found


@pytest.fixture
def haproxy_bin() -> str:
    return require_tool("haproxy", prefer=HAPROXY_PATH)


def start_cluster(
    upstream_url: str,
    workdir: Path,
    haproxy_bin: str,
    request: pytest.FixtureRequest,
    stack: list[MirrorProcess | HaproxyProcess],
) -> Cluster:
    nodes = []
    for number in range(1, NODES + 1):
        mirror = MirrorProcess(
            upstream_url=upstream_url,
            workdir=workdir / f"node{number}",
            extra_toml=NODE_TOML,
        )
        stack.append(mirror)
        start_or_fail(mirror.start)
        watch_log(request, f"node{number}", mirror.process)
        nodes.append(Node(f"node{number}", mirror))
    haproxy = HaproxyProcess(
        binary=haproxy_bin,
        workdir=workdir / "haproxy",
        servers=[
            Server(node.name, number, node.mirror.host)
            for number, node in enumerate(nodes, start=1)
        ],
    )
    stack.append(haproxy)
    start_or_fail(haproxy.start)
    watch_log(request, "haproxy", haproxy.process)
    return Cluster(nodes, haproxy)


@pytest.fixture
def cluster_stack() -> Iterator[list[MirrorProcess | HaproxyProcess]]:
    """What a test started, stopped (by PID) in reverse order after it."""
    stack: list[MirrorProcess | HaproxyProcess] = []
    yield stack
    for started in reversed(stack):
        started.stop()


# --- clients --------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients of one herd went through."""

    retries: Counter[str] = field(default_factory=Counter)
    """Retried GETs by the reason of the failed try."""
    verified: int = 0
    """Blobs received whole with the right digest."""

    def total_retries(self) -> int:
        return sum(self.retries.values())


async def get_verified(
    session: aiohttp.ClientSession, url: str, digest: str, tally: Tally
) -> bytes:
    """GET ``url`` until the body's sha256 is ``digest``: ATTEMPTS tries,
    PAUSE apart, as a pulling daemon retries a failed layer."""
    for _attempt in range(ATTEMPTS):
        reason = None
        try:
            async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as got:
                if got.status == 200:
                    body = await got.read()
                    if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                        return body
                    reason = "digest mismatch"
                else:
                    reason = f"status {got.status}"
        except aiohttp.ClientPayloadError:
            reason = "stream cut"
        except aiohttp.ClientConnectionError:
            reason = "connection"
        tally.retries[reason] += 1
        await asyncio.sleep(PAUSE)
    pytest.fail(f"{url}: no verified body after {ATTEMPTS} tries ({tally.retries})")


async def pull(base: str, published: Published, tally: Tally) -> None:
    """One client: the manifest by tag, then every blob at once, verified."""
    image = published.single
    repository = published.repository
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=HERD_LIMIT)
    ) as session:
        manifest = await get_verified(
            session,
            f"{base}/v2/{repository}/manifests/{published.tag}",
            image.digest,
            tally,
        )
        document = json.loads(manifest)
        digests = [document["config"]["digest"]] + [
            layer["digest"] for layer in document["layers"]
        ]
        assert set(digests) == image.blob_digests
        await asyncio.gather(
            *(
                get_verified(
                    session, f"{base}/v2/{repository}/blobs/{digest}", digest, tally
                )
                for digest in digests
            )
        )
        tally.verified += len(digests)


async def herd(base: str, published: Published, clients: int = CLIENTS) -> Tally:
    tally = Tally()
    async with asyncio.timeout(HERD_LIMIT):
        await asyncio.gather(*(pull(base, published, tally) for _ in range(clients)))
    assert tally.verified == clients * len(published.single.blob_digests)
    return tally


# --- reading the evidence -------------------------------------------------------


def blob_routes(routed: list[Routed], digests: set[str]) -> dict[str, set[str]]:
    """Digest -> the nodes HAProxy sent its blob requests to."""
    found: dict[str, set[str]] = {}
    for request in routed:
        if request.key in digests:
            found.setdefault(request.key, set()).add(request.server)
    return found


def describe(cluster: Cluster, digests: set[str]) -> str:
    holders = cluster.holders()
    return (
        ", ".join(
            f"{node.name}: {len(node.blobs() & digests)}" for node in cluster.nodes
        )
        + f" (holders {[sorted(holders.get(d, ())) for d in sorted(digests)]})"
    )


def evidence(
    cluster: Cluster,
    routed: list[Routed],
    gets: Counter[str],
    digests: set[str],
    victim: str,
) -> str:
    """Per blob: upstream GETs, where HAProxy sent it (with termination
    states) and which nodes hold it, for a failure message."""
    holders = cluster.holders()
    lines = [f"victim {victim}"]
    for digest in sorted(digests):
        sent = Counter(
            f"{r.server}:{r.status}:{r.termination}" for r in routed if r.key == digest
        )
        held = sorted(holders.get(digest, ()))
        lines.append(
            f"{digest[7:19]} gets={gets[digest]} holders={held} routed={dict(sent)}"
        )
    return "\n".join(lines)


async def manifest_upstream_requests(node: Node) -> float:
    """Manifest GETs and HEADs the node sent upstream since it started."""
    url = f"{node.mirror.url}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as got:
        assert got.status == 200
        found = samples(await got.text())
    return sum(
        count
        for (name, labels), count in found.items()
        if name == "mirror_upstream_requests_total"
        and dict(labels).get("kind") in ("manifest", "manifest_head")
    )


# --- tests ----------------------------------------------------------------------


async def test_a_herd_downloads_each_blob_once_and_stores_it_on_one_node(
    upstream: Upstream,
    haproxy_bin: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    cluster_stack: list[MirrorProcess | HaproxyProcess],
) -> None:
    published = await Publisher(upstream, tmp_path / "images").image(
        unique("cluster/herd-"), layer_sizes=LAYER_SIZES
    )
    digests = published.single.blob_digests
    cluster = start_cluster(upstream.url, tmp_path, haproxy_bin, request, cluster_stack)
    upstream_mark = upstream.mark()
    haproxy_mark = cluster.haproxy.mark()

    tally = await herd(cluster.haproxy.url, published)

    served = await upstream.requests_since(upstream_mark)
    gets = served.blob_gets()
    assert set(gets) == digests, served.describe()
    assert sum(gets.values()) == len(digests), (
        f"one upstream GET per blob across the cluster: {gets}"
    )
    assert tally.total_retries() == 0, tally.retries

    # Each blob lives on exactly one node, the one HAProxy sent it to.
    holders = cluster.holders()
    assert {d: len(holders.get(d, ())) for d in digests} == dict.fromkeys(digests, 1), (
        describe(cluster, digests)
    )
    routes = blob_routes(cluster.haproxy.requests(haproxy_mark), digests)
    assert routes == {d: holders[d] for d in digests}
    per_node = {node.name: len(node.blobs() & digests) for node in cluster.nodes}
    assert sum(1 for count in per_node.values() if count) > 1, (
        f"11 blobs should spread over more than one node: {per_node}"
    )
    # Every manifest request for the repository went to one node.
    repository_nodes = {
        r.server
        for r in cluster.haproxy.requests(haproxy_mark)
        if "/manifests/" in r.uri
    }
    assert len(repository_nodes) == 1, repository_nodes
    print(f"blobs per node: {per_node}; upstream blob GETs: {sum(gets.values())}")


async def test_a_node_killed_mid_herd_loses_only_its_keys_and_gets_them_back(
    upstream: Upstream,
    latency_proxy: ProxyFactory,
    haproxy_bin: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    cluster_stack: list[MirrorProcess | HaproxyProcess],
) -> None:
    published = await Publisher(upstream, tmp_path / "images").image(
        unique("cluster/failover-"), layer_sizes=LAYER_SIZES
    )
    digests = published.single.blob_digests
    sizes = {layer.digest: layer.descriptor.size for layer in published.single.layers}
    slow = latency_proxy(upstream.port, response=Link(rate=SLOW_RATE))
    cluster = start_cluster(slow.url, tmp_path, haproxy_bin, request, cluster_stack)
    upstream_mark = upstream.mark()
    haproxy_mark = cluster.haproxy.mark()

    clients = asyncio.create_task(herd(cluster.haproxy.url, published))
    # The victim: the first node seen with a blob finished and another
    # still streaming into tmp/ (a kill in the middle of a transfer).
    victim: Node | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while victim is None and loop.time() < deadline and not clients.done():
        for node in cluster.nodes:
            partial = {
                name: size for name, size in node.cache.tmp_files().items() if size > 0
            }
            if partial and node.blobs() & digests:
                victim = node
                break
        await asyncio.sleep(0.01)
    assert victim is not None, "no node was seen mid-transfer with a blob cached"
    victim.kill9()
    # What the node had finished when it died, and what it was downloading.
    finished_before_kill = victim.blobs() & digests
    streaming = victim.cache.tmp_files()
    assert streaming, "the kill should have cut a download in progress"
    down_after = await cluster.haproxy.wait_state(victim.name, "DOWN", within=30)

    tally = await clients
    # Every client ended with verified bytes, some after a cut stream.
    assert tally.retries["stream cut"] > 0, f"no transfer was cut: {tally.retries}"

    during = await upstream.requests_since(upstream_mark)
    routed = cluster.haproxy.requests(haproxy_mark)
    share = {
        d
        for d, servers in blob_routes(routed, digests).items()
        if victim.name in servers
    }
    assert share, "HAProxy routed no blob to the victim"
    assert share > finished_before_kill
    others = digests - share
    gets = during.blob_gets()
    table = evidence(cluster, routed, gets, digests, victim.name)
    # Only the victim's keys moved: every other blob was fetched once.
    assert {d: gets[d] for d in others} == dict.fromkeys(others, 1), table
    for digest in share:
        # Once by the victim, at most once more by the node its key moved to.
        assert 1 <= gets[digest] <= 2, table

    # Back on the same port and cache: its keys return, its finished blobs
    # are still there.
    victim.restart()
    up_after = await cluster.haproxy.wait_state(victim.name, "UP", within=30)
    assert victim.blobs() & digests == finished_before_kill
    await asyncio.sleep(2.5)  # past tag_ttl: the tag is due for revalidation
    before = {
        node.name: await manifest_upstream_requests(node) for node in cluster.nodes
    }
    upstream_mark = upstream.mark()
    haproxy_mark = cluster.haproxy.mark()

    again = await herd(cluster.haproxy.url, published)

    after = await upstream.requests_since(upstream_mark)
    refetched = after.blob_gets()
    assert set(refetched) == share - finished_before_kill, (
        f"only the victim's unfinished blobs: got {refetched}, share {share}, "
        f"finished before the kill {finished_before_kill}"
    )
    assert all(count == 1 for count in refetched.values()), refetched
    assert again.total_retries() == 0, again.retries
    second_routes = blob_routes(cluster.haproxy.requests(haproxy_mark), digests)
    assert {d for d, s in second_routes.items() if s == {victim.name}} == share
    assert all(len(servers) == 1 for servers in second_routes.values())
    # One node revalidated the tag (a HEAD, or a GET if it changed).
    revalidated = {
        node.name: await manifest_upstream_requests(node) - before[node.name]
        for node in cluster.nodes
    }
    assert sum(1 for count in revalidated.values() if count) == 1, revalidated
    tag_requests = [
        r for r in after if r.kind == "manifest" and r.reference == published.tag
    ]
    assert len(tag_requests) == 1, after.describe()

    print(
        f"victim {victim.name}: share {len(share)} blobs, "
        f"{len(finished_before_kill)} finished before the kill, "
        f"{len(streaming)} streaming; down after {down_after:.1f}s, "
        f"up after {up_after:.1f}s; retries {dict(tally.retries)}; "
        f"upstream blob GETs during the herd {sum(gets.values())} "
        f"for {len(digests)} blobs, after the restart {sum(refetched.values())}; "
        f"sizes of the share {[sizes.get(d, 0) for d in sorted(share)]}"
    )
