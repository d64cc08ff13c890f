"""All the cores of one machine: one mirror process against several (issue 12).

This module owns the benchmark that chooses between two ways for mirror to
use more than one core (docs/benchmarks.md#all-the-cores-of-one-machine):

* (a) ``server.workers = N``, SO_REUSEPORT processes sharing one cache
  directory with single-flight across processes. Not built. Its upper bound
  is measured instead: the same N processes, each driven directly by its
  share of the load at the same time (N wrk runs in parallel, one per port,
  their requests and bytes summed; the herd's clients split over the
  ports). That is what the kernel's SO_REUSEPORT spreading could give at
  best, with no HAProxy hop and before paying for cross-process
  single-flight, which this bound does not have: its herd shows the
  upstream GETs (a) would have to prevent.
* (b) HAProxy with the shipped consistent hashing
  (``deploy/haproxy/local-workers.cfg``, only ports changed) in front of N
  local processes, each with its own cache directory.

Arms, each an entry in the table: ``1 process`` (mirror today), ``2 via
haproxy`` ((b)), ``2 direct, split`` ((a)'s bound), and for the herd also
``3 via haproxy``: the issue's cluster scenario, three nodes behind HAProxy
against one node (on this machine, three processes on its two cores).

Scenarios, the existing benchmark's (``tests/bench/run.py``) where they
exist, with its settings: cached manifest by digest and by tag (wrk, 32
connections), cached blob (16 connections), the 20-client herd (wall time,
upstream blob GETs). The wrk loads run twice: on one image (one repository,
one blob: one key, so (b) sends all of it to one process), and spread over
several repositories and blobs chosen so that each process behind HAProxy
owns the same number of them (what a fleet pulling many images looks like).
During every load the CPU time of HAProxy and of the mirror processes is
read from ``/proc/<pid>/stat``. Two variants of HAProxy's file are measured
beside it, each a line added: ``option dontlog-normal`` (no log line per
request that went well) on the manifest loads, and ``no option
splice-response`` (bodies through HAProxy's buffers rather than moved with
splice(2), as the shipped file does) on the blob loads.

Usage: ``python -m tests.bench.cores [--quick] [--only TEXT] [--out DIR]
[--keep]``; writes ``cores.json`` and ``cores.txt`` to ``bench-results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.conftest import Published
from tests.integration.haproxy import HAPROXY_PATH, Server
from tests.integration.tools import find_tool

from . import pull, system
from .run import FULL, QUICK, REPO_ROOT, TOOLS, Bench, Settings, find_tools, say
from .targets import LocalHaproxy, MirrorTarget
from .wrk import WrkResult, run_wrk

MIB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Repositories for the spread loads, each an image of one layer; those the
# ring gives each process behind HAProxy are cut to the same number.
SPREAD_IMAGES = 16

ONE = "1 process"
VIA_2 = "2 via haproxy"
SPLIT_2 = "2 direct, split"
VIA_3 = "3 via haproxy"
SPLICE_2 = "2 via haproxy, no splice"
QUIET_2 = "2 via haproxy, no log"
WRK_ARMS = (ONE, VIA_2, QUIET_2, SPLIT_2)
BLOB_ARMS = (ONE, VIA_2, SPLICE_2, SPLIT_2)
HERD_ARMS = (ONE, VIA_2, SPLIT_2, VIA_3)
ALL_ARMS = (ONE, VIA_2, QUIET_2, SPLICE_2, SPLIT_2, VIA_3)
# A variant of the file for blobs only: without the shipped `option
# splice-response`, response bodies go through HAProxy's buffers.
NO_SPLICE = ("no option splice-response",)
# A variant for manifests: no log line per request that went well (the
# shipped file logs every request, with its shard key).
QUIET = ("option dontlog-normal",)


@dataclass(frozen=True)
class CoresSettings:
    base: Settings
    spread_layer_mib: int
    herd_rounds: int


FULL_CORES = CoresSettings(base=FULL, spread_layer_mib=8, herd_rounds=2)
QUICK_CORES = CoresSettings(base=QUICK, spread_layer_mib=4, herd_rounds=1)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # Fields 14 and 15 of stat(5); the first after the name is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Arm:
    """One way of serving: the URLs a load is split over, and the processes
    whose CPU counts (the mirrors, and HAProxy if there is one)."""

    name: str
    urls: list[str]
    mirror_pids: list[int]
    haproxy_pid: int | None = None


@dataclass
class Measured:
    """One load on one arm: summed wrk numbers and the CPU spent."""

    requests: int
    bytes: int
    seconds: float
    errors: int
    latency_p99_ms: float
    upstream_requests: int
    haproxy_cpu: float | None
    mirror_cpu: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests_per_second, 1),
            "mb_per_second": round(self.mb_per_second, 1),
            "errors": self.errors,
            "latency_p99_ms": self.latency_p99_ms,
            "upstream_requests": self.upstream_requests,
            "haproxy_cpu_cores": None
            if self.haproxy_cpu is None
            else round(self.haproxy_cpu / self.seconds, 3),
            "mirror_cpu_cores": round(self.mirror_cpu / self.seconds, 3),
        }


@dataclass
class HerdRun:
    seconds: float
    blobs: int
    upstream_blob_gets: int
    upstream_manifest_requests: int
    haproxy_cpu: float | None
    mirror_cpu: float

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "blobs": self.blobs,
            "upstream_blob_gets": self.upstream_blob_gets,
            "upstream_manifest_requests": self.upstream_manifest_requests,
            "haproxy_cpu_seconds": None
            if self.haproxy_cpu is None
            else round(self.haproxy_cpu, 3),
            "mirror_cpu_seconds": round(self.mirror_cpu, 3),
        }


def combine(results: Sequence[WrkResult]) -> tuple[int, int, float, int, float]:
    """Parallel wrk runs as one: requests and bytes summed over the longest
    duration, errors summed, the worst p99."""
    return (
        sum(r.requests for r in results),
        sum(r.bytes for r in results),
        max(r.seconds for r in results),
        sum(r.error_count for r in results),
        max(r.latency_p99_ms for r in results),
    )


def median_by(rounds: list[Measured], key: Callable[[Measured], float]) -> Measured:
    ordered = sorted(rounds, key=key)
    return ordered[len(ordered) // 2]


@dataclass
class Results:
    loads: dict[str, dict[str, list[Measured]]] = field(default_factory=dict)
    """scenario -> arm -> rounds."""
    herds: dict[str, list[HerdRun]] = field(default_factory=dict)
    split: dict[str, dict[str, int]] = field(default_factory=dict)
    """Spread keys: of the spread images', how many each process behind
    HAProxy owns, and how many of each the loads use, by kind."""
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    def add(self, scenario: str, arm: str, measured: Measured) -> None:
        self.loads.setdefault(scenario, {}).setdefault(arm, []).append(measured)

    def to_json(self) -> dict[str, Any]:
        return {
            "loads": {
                scenario: {
                    arm: [m.to_json() for m in rounds] for arm, rounds in arms.items()
                }
                for scenario, arms in self.loads.items()
            },
            "herds": {
                arm: [h.to_json() for h in runs] for arm, runs in self.herds.items()
            },
            "spread_keys_per_process": self.split,
            "peak_rss_mib": {k: round(v, 1) for k, v in self.peak_rss_mib.items()},
        }


class Cores:
    """One run: an upstream, three mirror processes, four HAProxies (two
    processes, three, and the two variants of the file on two)."""

    def __init__(
        self,
        settings: CoresSettings,
        tools: dict[str, str],
        workdir: Path,
        stack: contextlib.ExitStack,
    ) -> None:
        self.settings = settings
        self.base = settings.base
        self.tools = tools
        self.workdir = workdir
        self.stack = stack
        # The existing benchmark's upstream, images and wrk load (with its
        # "is it a hit" check); its own caches are not started.
        self.bench = Bench(settings.base, tools, workdir, workdir / "unused", stack)
        self.nodes: list[MirrorTarget] = []
        self.haproxies: dict[str, LocalHaproxy] = {}
        self.arms: dict[str, Arm] = {}
        self.results = Results()

    def start(self) -> None:
        self.bench.start_upstream()
        for number in (1, 2, 3):
            node = MirrorTarget(
                self.bench.upstream.url,
                self.workdir / f"node{number}",
                name=f"node{number}",
            )
            node.start()
            self.stack.callback(node.stop)
            self.nodes.append(node)
        variants: list[tuple[str, int, Sequence[str], Sequence[str]]] = [
            ("2", 2, (), ()),
            ("3", 3, (), ()),
            ("2-nosplice", 2, NO_SPLICE, ()),
            ("2-quiet", 2, QUIET, ()),
        ]
        for key, count, defaults, globals_ in variants:
            haproxy = LocalHaproxy(
                binary=self.tools["haproxy"],
                workdir=self.workdir / f"haproxy{key}",
                servers=[
                    Server(f"worker{n}", n, node.process.host)
                    for n, node in enumerate(self.nodes[:count], start=1)
                ],
                defaults=defaults,
                globals_=globals_,
            )
            haproxy.start()
            self.stack.callback(haproxy.stop)
            self.haproxies[key] = haproxy
        pids = [self.pid(node) for node in self.nodes]
        urls = [node.url for node in self.nodes]
        self.arms = {
            ONE: Arm(ONE, urls[:1], pids[:1]),
            VIA_2: Arm(
                VIA_2, [self.haproxies["2"].url], pids[:2], self.haproxies["2"].pid
            ),
            SPLIT_2: Arm(SPLIT_2, urls[:2], pids[:2]),
            VIA_3: Arm(VIA_3, [self.haproxies["3"].url], pids, self.haproxies["3"].pid),
            QUIET_2: Arm(
                QUIET_2,
                [self.haproxies["2-quiet"].url],
                pids[:2],
                self.haproxies["2-quiet"].pid,
            ),
            SPLICE_2: Arm(
                SPLICE_2,
                [self.haproxies["2-nosplice"].url],
                pids[:2],
                self.haproxies["2-nosplice"].pid,
            ),
        }

    @staticmethod
    def pid(node: MirrorTarget) -> int:
        pid = node.root_pid()
        assert pid is not None
        return pid

    async def warm(self, images: Sequence[Published]) -> None:
        """Pull every image from nodes 1 and 2 directly, then through the
        two-process HAProxy (hits): every load below is served from cache."""
        for image in images:
            for base in (self.nodes[0].url, self.nodes[1].url, self.haproxies["2"].url):
                await pull.pull_once(base, image.repository, image.tag)

    async def owners(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> the worker the two-process HAProxy sends it to (one GET
        each, read back from its log)."""
        haproxy = self.haproxies["2"]
        mark = haproxy.mark()
        async with pull.new_session() as session:
            for path in paths:
                url = f"{haproxy.url}{path}"
                async with session.get(url, headers=pull.MANIFEST_HEADERS) as got:
                    await got.read()
                    if got.status != 200:
                        raise pull.PullError(f"GET {url}: HTTP {got.status}")
        await asyncio.sleep(0.5)
        routed = {r.uri: r.server for r in haproxy.requests(mark)}
        return {path: routed[path] for path in paths}

    async def even(self, paths: Sequence[str], kind: str) -> list[str]:
        """The largest subset of ``paths`` with as many on each worker."""
        owner = await self.owners(paths)
        by_worker: dict[str, list[str]] = {"worker1": [], "worker2": []}
        for path in paths:
            by_worker[owner[path]].append(path)
        share = min(len(chosen) for chosen in by_worker.values())
        if share == 0:
            raise SystemExit(f"cores: the ring put every {kind} on one worker: {owner}")
        self.results.split[kind] = {
            **{f"{w} owns": len(chosen) for w, chosen in by_worker.items()},
            "used per worker": share,
        }
        return [path for chosen in by_worker.values() for path in chosen[:share]]

    async def measure(
        self,
        arm: Arm,
        paths: Sequence[str],
        *,
        connections: int,
        seconds: float,
        headers: dict[str, str] | None,
    ) -> Measured:
        """One wrk load, split evenly over the arm's URLs, run together."""
        for url in arm.urls:
            for path in paths:
                await self.bench._check_cached(f"{url}{path}", headers or {})
        share = len(arm.urls)
        threads = max(1, self.base.wrk_threads // share)
        mark = self.bench.upstream.mark()
        before = self.cpu(arm)
        runs = await asyncio.gather(
            *(
                run_wrk(
                    self.tools["wrk"],
                    f"{url}{paths[0]}",
                    workdir=self.workdir,
                    seconds=seconds,
                    connections=connections // share,
                    threads=threads,
                    headers=headers,
                    paths=paths if len(paths) > 1 else None,
                )
                for url in arm.urls
            )
        )
        after = self.cpu(arm)
        log = await self.bench.upstream_log(mark)
        requests, sent, took, errors, p99 = combine(runs)
        return Measured(
            requests=requests,
            bytes=sent,
            seconds=took,
            errors=errors,
            latency_p99_ms=p99,
            upstream_requests=len(log),
            haproxy_cpu=None if arm.haproxy_pid is None else after[0] - before[0],
            mirror_cpu=after[1] - before[1],
        )

    def cpu(self, arm: Arm) -> tuple[float, float]:
        haproxy = 0.0 if arm.haproxy_pid is None else cpu_seconds(arm.haproxy_pid)
        return haproxy, sum(cpu_seconds(pid) for pid in arm.mirror_pids)

    async def loads(self, scenario: str, paths: Sequence[str], *, blob: bool) -> None:
        seconds = self.base.blob_seconds if blob else self.base.manifest_seconds
        connections = (
            self.base.blob_connections if blob else self.base.manifest_connections
        )
        headers = None if blob else pull.MANIFEST_HEADERS
        for _ in range(self.base.rounds):
            for name in BLOB_ARMS if blob else WRK_ARMS:
                measured = await self.measure(
                    self.arms[name],
                    paths,
                    connections=connections,
                    seconds=seconds,
                    headers=headers,
                )
                self.results.add(scenario, name, measured)
                cpu = measured.to_json()
                say(
                    f"{scenario} / {name}: {measured.requests_per_second:.0f} req/s, "
                    f"{measured.mb_per_second:.0f} MB/s, "
                    f"haproxy {cpu['haproxy_cpu_cores']} cores, "
                    f"mirrors {cpu['mirror_cpu_cores']} cores, "
                    f"{measured.upstream_requests} upstream requests"
                )

    async def herd(self, name: str, image: Published) -> HerdRun:
        arm = self.arms[name]
        clients = self.base.herd_clients
        share = clients // len(arm.urls)
        mark = self.bench.upstream.mark()
        before = self.cpu(arm)
        started = time.perf_counter()
        await asyncio.gather(
            *(pull.herd(url, image.repository, image.tag, share) for url in arm.urls)
        )
        seconds = time.perf_counter() - started
        after = self.cpu(arm)
        log = await self.bench.upstream_log(mark)
        run = HerdRun(
            seconds=seconds,
            blobs=len(image.single.blob_digests),
            upstream_blob_gets=sum(log.blob_gets(successful=True).values()),
            upstream_manifest_requests=sum(1 for r in log if r.kind == "manifest"),
            haproxy_cpu=None if arm.haproxy_pid is None else after[0] - before[0],
            mirror_cpu=after[1] - before[1],
        )
        say(
            f"herd / {name}: {run.seconds:.2f} s, {run.upstream_blob_gets} upstream "
            f"blob GETs for {run.blobs} blobs"
        )
        return run

    async def herds(self) -> None:
        for round_number in range(self.settings.herd_rounds):
            images = await asyncio.gather(
                *(
                    self.bench.publish(
                        f"cores/herd-{number}-{round_number}",
                        self.base.herd_layers_mib,
                    )
                    for number in range(len(HERD_ARMS))
                )
            )
            await asyncio.to_thread(os.sync)
            for name, image in zip(HERD_ARMS, images, strict=True):
                run = await self.herd(name, image)
                self.results.herds.setdefault(name, []).append(run)

    def read_memory(self) -> None:
        for node in self.nodes:
            self.results.peak_rss_mib[node.name] = system.peak_rss(
                self.pid(node)
            ).max_mib
        for key, haproxy in self.haproxies.items():
            self.results.peak_rss_mib[f"haproxy{key}"] = system.peak_rss(
                haproxy.pid
            ).max_mib


async def cores(
    settings: CoresSettings,
    tools: dict[str, str],
    workdir: Path,
    only: str | None = None,
) -> Any:
    base = settings.base
    with contextlib.ExitStack() as stack:
        run = Cores(settings, tools, workdir, stack)
        say(f"starting the upstream, 3 mirror processes, 4 HAProxies ({workdir})")
        run.start()
        say("building and pushing images")
        image = await run.bench.publish("cores/image", base.image_layers_mib)
        spread = await asyncio.gather(
            *(
                run.bench.publish(f"cores/spread-{n}", (settings.spread_layer_mib,))
                for n in range(SPREAD_IMAGES)
            )
        )
        say("filling the caches")
        await run.warm([image, *spread])
        await asyncio.to_thread(os.sync)
        machine = system.machine(tools, REPO_ROOT)
        machine["versions"]["haproxy"] = system._version([tools["haproxy"], "-v"])
        machine["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        manifests = f"/v2/{image.repository}/manifests"
        layer = max(image.single.layers, key=lambda layer: layer.descriptor.size)
        by_tag = {
            f"/v2/{i.repository}/manifests/{i.tag}": f"/v2/{i.repository}/manifests/"
            f"{i.digest}"
            for i in spread
        }
        spread_tags = await run.even(list(by_tag), "repositories")
        spread_digests = [by_tag[path] for path in spread_tags]
        spread_blobs = await run.even(
            [f"/v2/{i.repository}/blobs/{i.single.layers[0].digest}" for i in spread],
            "blobs",
        )
        scenarios: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (
                "manifest by digest, 1 repo",
                lambda: run.loads(
                    "manifest by digest, 1 repo",
                    [f"{manifests}/{image.digest}"],
                    blob=False,
                ),
            ),
            (
                "manifest by tag, 1 repo",
                lambda: run.loads(
                    "manifest by tag, 1 repo", [f"{manifests}/{image.tag}"], blob=False
                ),
            ),
            (
                "manifest by digest, spread",
                lambda: run.loads(
                    "manifest by digest, spread", spread_digests, blob=False
                ),
            ),
            (
                "manifest by tag, spread",
                lambda: run.loads("manifest by tag, spread", spread_tags, blob=False),
            ),
            (
                "cached blob, 1 blob",
                lambda: run.loads(
                    "cached blob, 1 blob",
                    [f"/v2/{image.repository}/blobs/{layer.digest}"],
                    blob=True,
                ),
            ),
            (
                "cached blob, spread",
                lambda: run.loads("cached blob, spread", spread_blobs, blob=True),
            ),
        ]
        for label, scenario in scenarios:
            if only is None or only in label:
                await scenario()
        if only is None or "herd" in only:
            await run.herds()
        run.read_memory()
        machine["load_average_at_end"] = system.load_average()
        machine["ended_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return {
        "machine": machine,
        "settings": {
            **dataclasses.asdict(base),
            "spread_layer_mib": settings.spread_layer_mib,
            "herd_rounds": settings.herd_rounds,
            "spread_images": SPREAD_IMAGES,
        },
        "results": run.results,
    }


# --- the table ------------------------------------------------------------------


def cell(rounds: list[Measured] | None, blob: bool) -> str:
    if not rounds:
        return "-"
    if blob:
        best = median_by(rounds, lambda m: m.mb_per_second)
        text = f"{best.mb_per_second:.0f} MB/s"
    else:
        best = median_by(rounds, lambda m: m.requests_per_second)
        text = f"{best.requests_per_second:.0f}"
    if sum(m.errors for m in rounds):
        text += f" ({sum(m.errors for m in rounds)} errors)"
    return text


def cpu_cell(rounds: list[Measured] | None, blob: bool) -> str:
    if not rounds:
        return "-"
    best = median_by(
        rounds, (lambda m: m.mb_per_second) if blob else lambda m: m.requests_per_second
    )
    data = best.to_json()
    mirror = f"{data['mirror_cpu_cores']:.2f}"
    haproxy = data["haproxy_cpu_cores"]
    return mirror if haproxy is None else f"{mirror} + {haproxy:.2f}"


def herd_cell(runs: list[HerdRun] | None, pick: Callable[[HerdRun], str]) -> str:
    return "-" if not runs else " / ".join(pick(run) for run in runs)


def table(results: Results) -> str:
    arms = list(ALL_ARMS)
    rows: list[list[str]] = [["", *arms]]
    for scenario, arm_rounds in results.loads.items():
        blob = scenario.startswith("cached blob")
        unit = "" if blob else ", req/s"
        rows.append(
            [f"{scenario}{unit}", *(cell(arm_rounds.get(a), blob) for a in arms)]
        )
        rows.append(
            [
                "  CPU, cores: mirrors + haproxy",
                *(cpu_cell(arm_rounds.get(a), blob) for a in arms),
            ]
        )
    herds = results.herds
    rows.append(
        [
            "herd, s (each round)",
            *(herd_cell(herds.get(a), lambda h: f"{h.seconds:.2f}") for a in arms),
        ]
    )
    rows.append(
        [
            "herd, upstream blob GETs / blobs",
            *(
                herd_cell(herds.get(a), lambda h: f"{h.upstream_blob_gets}/{h.blobs}")
                for a in arms
            ),
        ]
    )
    rows.append(
        [
            "herd, haproxy CPU-s",
            *(
                herd_cell(
                    herds.get(a),
                    lambda h: "-" if h.haproxy_cpu is None else f"{h.haproxy_cpu:.2f}",
                )
                for a in arms
            ),
        ]
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if number == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def summary(document: dict[str, Any]) -> str:
    results: Results = document["results"]
    machine = document["machine"]
    rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in results.peak_rss_mib.items())
    return "\n".join(
        [
            f"Run {machine['started_utc']} to {machine['ended_utc']} UTC on "
            f"{machine['cpu']}, {machine['cores']} cores, load average at start "
            f"{machine['load_average_at_start']}, at end "
            f"{machine['load_average_at_end']}.",
            "Versions: "
            + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
            + ".",
            f"Spread keys per worker behind HAProxy: {results.split}.",
            "",
            table(results),
            "",
            f"Peak RSS (largest process): {rss}.",
        ]
    )


def write(out: Path, document: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "cores.json"
    data = {**document, "results": document["results"].to_json()}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    text_path = out / "cores.txt"
    text_path.write_text(summary(document) + "\n")
    return json_path, text_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.cores",
        description="One mirror process against several: HAProxy or SO_REUSEPORT.",
    )
    parser.add_argument("--quick", action="store_true", help="one round of each")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="run only the scenarios whose name contains TEXT ('herd' for the herd)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench-results",
        help="where cores.json and cores.txt go",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tools = find_tools(TOOLS)
    haproxy = find_tool("haproxy")
    if haproxy is None and not Path(HAPROXY_PATH).exists():
        raise SystemExit("cores: haproxy missing; `apt-get install haproxy`")
    tools["haproxy"] = haproxy or HAPROXY_PATH
    settings = QUICK_CORES if args.quick else FULL_CORES
    workdir = Path(tempfile.mkdtemp(prefix="mirror-cores-"))
    started = time.monotonic()
    ok = False
    try:
        document = asyncio.run(cores(settings, tools, workdir, args.only))
        print()
        print(summary(document))
        json_path, text_path = write(args.out, document)
        print(f"\nwrote {json_path} and {text_path}")
        ok = True
    finally:
        if args.keep or not ok:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
