"""Run the benchmark: one upstream, three caches, six scenarios, one report.

This module owns the run's order and settings. It starts the upstream (the
distribution registry) and pushes generated images to it, starts mirror,
distribution's proxy mode and nginx with empty caches, drives the scenarios
against each of them and against the upstream directly, reads every cache's
peak memory, stops everything it started and writes the report
(``tests/bench/report.py``). Scenarios run target by target inside each
scenario, so slow drift on a shared machine spreads over all targets.

Usage: ``python -m tests.bench [--quick] [--profile] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.conftest import Published, Publisher
from tests.integration.skopeo import Skopeo
from tests.integration.tools import find_tool
from tests.integration.upstream import RequestLog, Upstream

from . import pull, report, system
from .profile import Profiler
from .report import Herd, Load, TargetResults
from .targets import Direct, MirrorTarget, NginxCache, ProxyRegistry, Target
from .wrk import WrkResult, run_wrk

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
TOOLS = ("docker-registry", "skopeo", "nginx", "wrk")
CACHE_HEADERS = ("X-Mirror-Cache", "X-Cache-Status")


@dataclass(frozen=True)
class Settings:
    """Sizes, repetitions and durations; ``QUICK`` is the short pass."""

    image_layers_mib: tuple[int, ...] = (10, 20, 30, 40)
    herd_layers_mib: tuple[int, ...] = (5, 10, 15, 20)
    herd_clients: int = 20
    cold_repeats: int = 3
    warm_repeats: int = 3
    direct_repeats: int = 3
    blob_seconds: float = 5
    blob_connections: int = 16
    manifest_seconds: float = 10
    manifest_connections: int = 32
    wrk_threads: int = 2
    rounds: int = 3


FULL = Settings()
QUICK = dataclasses.replace(
    FULL,
    herd_layers_mib=(2, 4, 6, 8),
    cold_repeats=1,
    warm_repeats=2,
    rounds=1,
    blob_seconds=4,
    manifest_seconds=4,
)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def find_tools(names: Sequence[str]) -> dict[str, str]:
    """Locate every tool or exit with what to install."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; install with "
            "`apt-get install docker-registry skopeo nginx wrk` "
            "(and `pip install py-spy` for --profile)"
        )
    return {name: path for name, path in found.items() if path is not None}


class Bench:
    """One run: the processes it started and the numbers it took."""

    def __init__(
        self,
        settings: Settings,
        tools: dict[str, str],
        workdir: Path,
        out: Path,
        stack: contextlib.ExitStack,
    ) -> None:
        self.settings = settings
        self.tools = tools
        self.workdir = workdir
        self.out = out
        self.stack = stack
        skopeo = Skopeo.create(tools["skopeo"], workdir / "skopeo")
        self.upstream = Upstream(
            binary=tools["docker-registry"], skopeo=skopeo, workdir=workdir / "upstream"
        )
        self.publisher = Publisher(self.upstream, workdir / "images")
        self.caches: list[Target] = []
        self.direct = Direct(self.upstream)
        self.results: dict[str, TargetResults] = {}
        self.profiles: dict[str, Any] = {}

    @property
    def everyone(self) -> list[Target]:
        return [*self.caches, self.direct]

    # --- set-up ---------------------------------------------------------------

    def start_upstream(self) -> None:
        self.upstream.start()
        self.stack.callback(self.upstream.stop)

    def start_caches(self) -> None:
        mirror = MirrorTarget(self.upstream.url, self.workdir / "mirror")
        dist = ProxyRegistry(
            binary=self.tools["docker-registry"],
            upstream_url=self.upstream.url,
            workdir=self.workdir / "dist",
        )
        nginx = NginxCache(
            binary=self.tools["nginx"],
            upstream_port=self.upstream.port,
            workdir=self.workdir / "nginx",
        )
        for cache in (mirror, dist, nginx):
            cache.start()
            self.stack.callback(cache.stop)
            self.caches.append(cache)
        for target in self.everyone:
            self.results[target.name] = TargetResults(target.name)

    async def publish(self, repository: str, layers_mib: tuple[int, ...]) -> Published:
        return await self.publisher.image(
            repository,
            tag="latest",
            flavour="docker",
            layer_sizes=[size * MIB for size in layers_mib],
        )

    async def upstream_log(self, mark: int) -> RequestLog:
        """Every request the upstream logged since ``mark``."""
        return await self.upstream.requests_since(mark)

    # --- scenarios ------------------------------------------------------------

    async def cold_pulls(self, image: Published) -> None:
        """Scenario 1: every cache empty; repeated by restarting it empty."""
        for repeat in range(self.settings.cold_repeats):
            for cache in self.caches:
                if repeat:
                    await asyncio.to_thread(cache.reset)
                result = await pull.pull_once(cache.url, image.repository, image.tag)
                self.results[cache.name].cold_pull.append(result.seconds)
                say(f"cold pull #{repeat + 1} {cache.name}: {result.seconds:.2f} s")
        for repeat in range(self.settings.direct_repeats):
            result = await pull.pull_once(self.direct.url, image.repository, image.tag)
            self.results["direct"].cold_pull.append(result.seconds)
            say(f"direct pull #{repeat + 1}: {result.seconds:.2f} s")

    async def warm_pulls(self, image: Published) -> None:
        """Scenario 2: the same pull with every cache full."""
        for _ in range(self.settings.warm_repeats):
            for target in self.everyone:
                result = await pull.pull_once(target.url, image.repository, image.tag)
                self.results[target.name].warm_pull.append(result.seconds)
        for target in self.everyone:
            say(f"warm pull {target.name}: {self.results[target.name].warm:.2f} s")

    async def herds(self, images: dict[str, Published]) -> None:
        """Scenario 3: many clients pulling one image new to the target at once."""
        for target in self.everyone:
            image = images[target.name]
            mark = self.upstream.mark()
            result = await pull.herd(
                target.url, image.repository, image.tag, self.settings.herd_clients
            )
            log = await self.upstream_log(mark)
            self.results[target.name].herd = Herd(
                seconds=result.seconds,
                client_seconds=result.client_seconds,
                blobs=len(image.single.blob_digests),
                upstream_blob_gets=dict(log.blob_gets(successful=True)),
                upstream_manifest_requests=sum(
                    1 for request in log if request.kind == "manifest"
                ),
            )
            say(
                f"herd {target.name}: {result.seconds:.2f} s, "
                f"{sum(log.blob_gets(successful=True).values())} upstream blob GETs"
            )

    async def load(
        self,
        target: Target,
        path: str,
        *,
        seconds: float,
        connections: int,
        headers: dict[str, str] | None = None,
    ) -> tuple[WrkResult, int]:
        """One wrk run, after checking the URL answers 200 (and is a hit).

        Returns wrk's summary and how many requests reached the upstream.
        """
        url = f"{target.url}{path}"
        await self._check_cached(url, headers or {})
        mark = self.upstream.mark()
        wrk = await run_wrk(
            self.tools["wrk"],
            url,
            workdir=self.workdir,
            seconds=seconds,
            connections=connections,
            threads=self.settings.wrk_threads,
            headers=headers,
        )
        log = await self.upstream_log(mark)
        return wrk, len(log)

    async def _check_cached(self, url: str, headers: dict[str, str]) -> None:
        """GET ``url`` twice: the first may refresh a tag past its TTL, the
        second must be a 200 and, where the cache says so, a hit."""
        async with pull.new_session() as session:
            for _ in range(2):
                async with session.get(url, headers=headers) as response:
                    await response.read()
                if response.status != 200:
                    raise pull.PullError(f"GET {url}: HTTP {response.status}")
            for name in CACHE_HEADERS:
                value = response.headers.get(name, "").lower()
                if value and value != "hit":
                    raise pull.PullError(f"GET {url}: {name}: {value}, not a hit")

    async def load_rounds(
        self,
        label: str,
        path: str,
        *,
        seconds: float,
        connections: int,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Load]:
        """``settings.rounds`` wrk runs per target, alternating targets."""
        loads = {target.name: Load() for target in self.everyone}
        for _ in range(self.settings.rounds):
            for target in self.everyone:
                wrk, upstream = await self.load(
                    target,
                    path,
                    seconds=seconds,
                    connections=connections,
                    headers=headers,
                )
                loads[target.name].add(wrk, upstream)
                say(
                    f"{label} {target.name}: {wrk.requests_per_second:.0f} req/s, "
                    f"{wrk.mb_per_second:.0f} MB/s, {upstream} upstream requests"
                )
        return loads

    async def blob_throughput(self, image: Published) -> None:
        """Scenario 4: the largest layer, cached, over many connections."""
        layer = max(image.single.layers, key=lambda layer: layer.descriptor.size)
        loads = await self.load_rounds(
            "cached blob",
            f"/v2/{image.repository}/blobs/{layer.digest}",
            seconds=self.settings.blob_seconds,
            connections=self.settings.blob_connections,
        )
        for name, load in loads.items():
            self.results[name].blob = load

    def manifest_paths(self, image: Published) -> dict[str, str]:
        base = f"/v2/{image.repository}/manifests"
        return {"digest": f"{base}/{image.digest}", "tag": f"{base}/{image.tag}"}

    async def manifests(self, image: Published) -> None:
        """Scenario 5: cached manifests by digest and by tag, many connections."""
        paths = self.manifest_paths(image)
        by_kind = {
            kind: await self.load_rounds(
                f"manifest by {kind}",
                path,
                seconds=self.settings.manifest_seconds,
                connections=self.settings.manifest_connections,
                headers=pull.MANIFEST_HEADERS,
            )
            for kind, path in paths.items()
        }
        for name, result in self.results.items():
            result.manifest_digest = by_kind["digest"][name]
            result.manifest_tag = by_kind["tag"][name]

    def note_memory(self, scenario: str) -> None:
        """Each cache's peak RSS so far, to tell which scenario set it."""
        for cache in self.caches:
            pid = cache.root_pid()
            if pid is not None:
                peak = system.peak_rss(pid).total_mib
                self.results[cache.name].rss_after[scenario] = peak

    def read_memory(self) -> None:
        """Scenario 6: each cache's peak RSS, before anything is stopped."""
        for cache in self.caches:
            pid = cache.root_pid()
            if pid is not None:
                self.results[cache.name].rss = system.peak_rss(pid)

    async def profile_mirror(self, image: Published) -> None:
        """py-spy on mirror during blob and manifest loads (not measured)."""
        mirror = next(cache for cache in self.caches if cache.name == "mirror")
        pid = mirror.root_pid()
        assert pid is not None
        layer = max(image.single.layers, key=lambda layer: layer.descriptor.size)
        loads: dict[str, tuple[str, int, dict[str, str] | None]] = {
            "blob": (
                f"/v2/{image.repository}/blobs/{layer.digest}",
                self.settings.blob_connections,
                None,
            ),
        }
        for kind, path in self.manifest_paths(image).items():
            loads[f"manifest-{kind}"] = (
                path,
                self.settings.manifest_connections,
                pull.MANIFEST_HEADERS,
            )
        seconds = max(self.settings.blob_seconds, self.settings.manifest_seconds)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, (path, connections, headers) in loads.items():
            profiler = Profiler(
                self.tools["py-spy"], pid, self.out / f"profile-{name}.txt"
            )
            profile, (wrk, _) = await asyncio.gather(
                profiler.record(seconds),
                self.load(
                    mirror,
                    path,
                    seconds=seconds + 1,
                    connections=connections,
                    headers=headers,
                ),
            )
            self.profiles[name] = {
                **profile.to_json(),
                "requests_per_second_under_profiler": round(wrk.requests_per_second, 1),
            }
            say(f"profile of mirror under {name} load:\n{profile.describe()}")


async def bench(
    settings: Settings,
    tools: dict[str, str],
    workdir: Path,
    out: Path,
    *,
    profile: bool,
) -> None:
    with contextlib.ExitStack() as stack:
        run = Bench(settings, tools, workdir, out, stack)
        say(f"starting the upstream registry (work directory {workdir})")
        run.start_upstream()
        say(f"building and pushing images ({sum(settings.image_layers_mib)} MiB)")
        image = await run.publish("bench/image", settings.image_layers_mib)
        say("starting mirror, distribution (proxy) and nginx with empty caches")
        run.start_caches()
        names = [target.name for target in run.everyone]
        published = await asyncio.gather(
            *(run.publish(f"bench/herd-{n}", settings.herd_layers_mib) for n in names)
        )
        herd_images = dict(zip(names, published, strict=True))
        machine = system.machine(tools, REPO_ROOT)
        # Let the pushes' dirty pages reach the disk now, not during a pull.
        await asyncio.to_thread(os.sync)
        scenarios = {
            "cold pull": functools.partial(run.cold_pulls, image),
            "warm pull": functools.partial(run.warm_pulls, image),
            "herd": functools.partial(run.herds, herd_images),
            "cached blob": functools.partial(run.blob_throughput, image),
            "manifests": functools.partial(run.manifests, image),
        }
        for scenario, scenario_run in scenarios.items():
            await scenario_run()
            run.note_memory(scenario)
        if profile:
            await run.profile_mirror(image)
        run.read_memory()
        machine["load_average_at_end"] = system.load_average()
    checks = report.evaluate(run.results)
    print()
    print(report.text_table(run.results))
    print()
    print(report.checks_text(checks))
    json_path, md_path = report.write(
        out,
        machine=machine,
        settings={**dataclasses.asdict(settings), "profile": profile},
        results=run.results,
        checks=checks,
        profiles=run.profiles,
    )
    print(f"\nwrote {json_path} and {md_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark mirror against distribution's proxy and nginx.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of everything: about 75 s instead of 6 minutes",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run py-spy on mirror under the blob and manifest loads",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench-results",
        help="where results.json, results.md and profiles go",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, caches)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tools = find_tools([*TOOLS, *(["py-spy"] if args.profile else [])])
    settings = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    started = time.monotonic()
    ok = False
    try:
        asyncio.run(bench(settings, tools, workdir, args.out, profile=args.profile))
        ok = True
    finally:
        if args.keep or not ok:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        say(f"done in {time.monotonic() - started:.0f} s")
    return 0
