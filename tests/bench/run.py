"""Run the benchmark: one upstream, three caches, eight scenarios, one report.

This module owns the run's order and settings. It starts the upstream (the
distribution registry) and pushes generated images to it, starts mirror,
distribution's proxy mode and nginx with empty caches, drives the scenarios
against each of them and against the upstream directly, reads every cache's
peak memory, stops everything it started and writes the report
(``tests/bench/report.py``). Scenarios run target by target inside each
scenario, so slow drift on a shared machine spreads over all targets.

The herd also runs against the cluster (issue 12): three mirror processes
behind HAProxy (``HaproxyCluster``), started with the caches. The WAN
scenario (issue 12) puts the upstream behind a latency and bandwidth proxy
(``tests/bench/wanproxy.py``, a process of its own) and starts a second,
empty instance of each cache pointed at it, for cold pulls and a herd;
direct then pulls through the proxy too. The client-auth scenario (issue
10) starts a second mirror with ``auth.htpasswd`` and compares it with the
first, auth off against auth on.

Usage: ``python -m tests.bench [--quick] [--profile] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Published, Publisher
from tests.integration.skopeo import Skopeo
from tests.integration.tools import find_tool
from tests.integration.upstream import RequestLog, Upstream

from . import pull, report, system
from .profile import Profiler
from .report import AuthSide, ClientAuthResults, Herd, Load, TargetResults
from .system import PeakRss
from .targets import (
    AuthMirrorTarget,
    Cache,
    Direct,
    HaproxyCluster,
    MirrorTarget,
    NginxCache,
    ProxyRegistry,
    Target,
)
from .wanproxy import WAN_LATENCY, WAN_RATE, WanProxy
from .wrk import WrkResult, run_wrk

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
TOOLS = ("docker-registry", "skopeo", "nginx", "wrk", "haproxy")
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
    # Client auth: the cost of the users' bcrypt hashes (bcrypt's default;
    # `htpasswd -B` defaults to 5), and repetitions that --quick keeps too,
    # since its checks are a 10% margin that one short round cannot settle
    # (a warm pull varies by more than that from one to the next).
    auth_bcrypt_cost: int = 12
    auth_rounds: int = 3
    auth_pull_repeats: int = 11
    auth_new_logins: int = 3


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


def slug(name: str) -> str:
    """A target's name as a repository path component ("mirror-3-via-haproxy")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


ColdPick = Callable[[TargetResults], list[float]]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def find_tools(names: Sequence[str]) -> dict[str, str]:
    """Locate every tool or exit with what to install."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; install with "
            "`apt-get install docker-registry skopeo nginx wrk haproxy` "
            "(and `pip install py-spy` for --profile)"
        )
    return {name: path for name, path in found.items() if path is not None}


@dataclass(frozen=True)
class AuthArm:
    """One side of the client-auth scenario: a mirror, where its numbers go,
    and the ``Authorization`` value it is sent (None: auth off)."""

    target: Target
    side: AuthSide
    authorization: str | None

    @property
    def name(self) -> str:
        return "auth off" if self.authorization is None else "auth on"

    @property
    def headers(self) -> dict[str, str]:
        return (
            {} if self.authorization is None else {"Authorization": self.authorization}
        )

    async def pull_image(self, image: Published) -> pull.PullResult:
        return await pull.pull_once(
            self.target.url,
            image.repository,
            image.tag,
            authorization=self.authorization,
        )


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
        self.caches: list[Cache] = []
        self.direct = Direct(self.upstream)
        self.cluster: HaproxyCluster | None = None
        self.results: dict[str, TargetResults] = {}
        self.client_auth: ClientAuthResults | None = None
        self.profiles: dict[str, Any] = {}

    @property
    def everyone(self) -> list[Target]:
        return [*self.caches, self.direct]

    @property
    def mirror(self) -> Target:
        return next(cache for cache in self.caches if cache.name == "mirror")

    # --- set-up ---------------------------------------------------------------

    def start_upstream(self) -> None:
        self.upstream.start()
        self.stack.callback(self.upstream.stop)

    def new_caches(self, url: str, port: int, root: Path) -> list[Cache]:
        """mirror, distribution and nginx in front of ``url`` (the upstream,
        or a proxy of it on ``port``), their files under ``root``; not started."""
        return [
            MirrorTarget(url, root / "mirror"),
            ProxyRegistry(
                binary=self.tools["docker-registry"],
                upstream_url=url,
                workdir=root / "dist",
            ),
            NginxCache(
                binary=self.tools["nginx"],
                upstream_port=port,
                workdir=root / "nginx",
            ),
        ]

    def start_caches(self) -> None:
        """The caches and the cluster, empty, in front of the upstream."""
        for cache in self.new_caches(
            self.upstream.url, self.upstream.port, self.workdir
        ):
            cache.start()
            self.stack.callback(cache.stop)
            self.caches.append(cache)
        cluster = HaproxyCluster(
            upstream_url=self.upstream.url,
            workdir=self.workdir / "cluster",
            haproxy_binary=self.tools["haproxy"],
        )
        self.stack.callback(cluster.stop)
        cluster.start()
        self.cluster = cluster
        for target in self.caches:
            self.results[target.name] = TargetResults(target.name)
            if target.name == "mirror":
                self.results[cluster.name] = TargetResults(cluster.name)
        self.results[self.direct.name] = TargetResults(self.direct.name)

    @property
    def herd_targets(self) -> list[Target]:
        """Who meets the herd: everyone, and the cluster after mirror."""
        targets: list[Target] = []
        for target in self.everyone:
            targets.append(target)
            if target.name == "mirror" and self.cluster is not None:
                targets.append(self.cluster)
        return targets

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
        await self._cold(
            self.caches, self.direct, image, lambda r: r.cold_pull, "cold pull"
        )

    async def _cold(
        self,
        caches: Sequence[Target],
        direct: Target,
        image: Published,
        pick: ColdPick,
        label: str,
    ) -> None:
        """``cold_repeats`` pulls from each of ``caches``, started empty and
        reset empty between repeats, then ``direct_repeats`` from ``direct``;
        each time into ``pick(results)``."""
        for repeat in range(self.settings.cold_repeats):
            for cache in caches:
                if repeat:
                    await asyncio.to_thread(cache.reset)
                result = await pull.pull_once(cache.url, image.repository, image.tag)
                pick(self.results[cache.name]).append(result.seconds)
                say(f"{label} #{repeat + 1} {cache.name}: {result.seconds:.2f} s")
        for repeat in range(self.settings.direct_repeats):
            result = await pull.pull_once(direct.url, image.repository, image.tag)
            pick(self.results[direct.name]).append(result.seconds)
            say(f"{label} #{repeat + 1} {direct.name}: {result.seconds:.2f} s")

    async def warm_pulls(self, image: Published) -> None:
        """Scenario 2: the same pull with every cache full."""
        for _ in range(self.settings.warm_repeats):
            for target in self.everyone:
                result = await pull.pull_once(target.url, image.repository, image.tag)
                self.results[target.name].warm_pull.append(result.seconds)
        for target in self.everyone:
            say(f"warm pull {target.name}: {self.results[target.name].warm:.2f} s")

    async def herds(self, images: dict[str, Published]) -> None:
        """Scenario 3: many clients pulling one image new to the target at once;
        the cluster too."""
        for target in self.herd_targets:
            herd = await self._herd(target, images[target.name], "herd")
            self.results[target.name].herd = herd

    async def _herd(self, target: Target, image: Published, label: str) -> Herd:
        """``herd_clients`` pulls of ``image`` from ``target`` at once, and
        what reached the upstream meanwhile (its own log)."""
        mark = self.upstream.mark()
        result = await pull.herd(
            target.url, image.repository, image.tag, self.settings.herd_clients
        )
        log = await self.upstream_log(mark)
        herd = Herd(
            seconds=result.seconds,
            client_seconds=result.client_seconds,
            blobs=len(image.single.blob_digests),
            upstream_blob_gets=dict(log.blob_gets(successful=True)),
            upstream_manifest_requests=sum(
                1 for request in log if request.kind == "manifest"
            ),
        )
        say(
            f"{label} {target.name}: {herd.seconds:.2f} s, "
            f"{herd.total_blob_gets} upstream blob GETs for {herd.blobs} blobs"
        )
        return herd

    async def wan(self, image: Published, herd_images: dict[str, Published]) -> None:
        """Scenario 8: the upstream over a WAN, for every target.

        A ``WanProxy`` in front of the upstream, a second instance of each
        cache pointed at it (empty, its own files under ``wan/``), and
        direct pulling through it: scenario 1's cold pulls of the same
        image, then scenario 3's herd, each target on an image new to it.
        The WAN instances and the proxy are stopped at the end.
        """
        proxy = WanProxy(self.upstream.port)
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(proxy.start)
            stack.callback(proxy.stop)
            say(
                f"WAN proxy on {proxy.url}: {WAN_LATENCY * 1000:.0f} ms each way, "
                f"{WAN_RATE * 8 / 1e6:.0f} Mbit/s per connection"
            )
            caches = self.new_caches(proxy.url, proxy.port, self.workdir / "wan")
            for cache in caches:
                stack.callback(cache.stop)
                await asyncio.to_thread(cache.start)
            direct = Direct(self.upstream, via=proxy.url)
            await self._cold(
                caches, direct, image, lambda r: r.wan_cold_pull, "WAN cold pull"
            )
            targets: list[Target] = [*caches, direct]
            for target in targets:
                herd = await self._herd(target, herd_images[target.name], "WAN herd")
                self.results[target.name].wan_herd = herd
        counters = proxy.counters
        say(
            f"WAN proxy: {counters.get('connections')} connections, "
            f"{counters.get('bytes_to_client', 0) / 1e6:.0f} MB to clients"
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
        for name in by_kind["digest"]:
            self.results[name].manifest_digest = by_kind["digest"][name]
            self.results[name].manifest_tag = by_kind["tag"][name]

    async def client_auth_scenario(self, image: Published) -> None:
        """Scenario 7: mirror with auth on against the same mirror with auth off.

        A second mirror with ``auth.htpasswd`` is started and filled by one
        pull. Then, alternating the two mirrors inside each round, scenario
        5's wrk load on the manifest by digest and by tag (the auth mirror's
        with credentials on every request), and warm pulls, median of
        ``auth_pull_repeats``. Last, ``auth_new_logins`` auth-on pulls, each
        with a login the mirror has not seen, so each pays one bcrypt check:
        what a pull costs once the mirror's verified login has expired (after
        a minute); compared with nothing. Every auth-on load is checked to be
        authenticated (``_auth_load``, ``_auth_pulls``).
        """
        cost = self.settings.auth_bcrypt_cost
        secured = AuthMirrorTarget(
            upstream_url=self.upstream.url,
            workdir=self.workdir / "mirror-auth",
            bcrypt_cost=cost,
            spare_users=self.settings.auth_new_logins,
        )
        await asyncio.to_thread(secured.start)
        self.stack.callback(secured.stop)
        result = ClientAuthResults(
            bcrypt_cost=cost, bcrypt_seconds=await asyncio.to_thread(time_bcrypt, cost)
        )
        self.client_auth = result
        say(f"client auth: bcrypt cost {cost}, {result.bcrypt_seconds:.3f} s a check")
        arms = (
            AuthArm(self.mirror, result.off, None),
            AuthArm(secured, result.on, secured.authorization()),
        )
        await arms[1].pull_image(image)  # fills the auth mirror's cache; not measured
        for kind, path in self.manifest_paths(image).items():
            label = f"manifest by {kind}"
            for _ in range(self.settings.auth_rounds):
                for arm in arms:
                    wrk, upstream = await self._auth_load(arm, label, path)
                    arm.side.manifest(kind).add(wrk, upstream)
                    say(
                        f"{arm.name}, {label}: {wrk.requests_per_second:.0f} req/s, "
                        f"{upstream} upstream requests"
                    )
        await self._auth_pulls(image, arms)
        for number in range(1, self.settings.auth_new_logins + 1):
            first = AuthArm(secured, result.on, secured.authorization(number))
            result.on.first_login_pull.append((await first.pull_image(image)).seconds)
        for arm in arms:
            say(f"{arm.name}, warm pull: {arm.side.warm:.3f} s")
        say(f"auth on, warm pull with a new login: {result.on.first_login:.3f} s")

    async def _auth_load(
        self, arm: AuthArm, label: str, path: str
    ) -> tuple[WrkResult, int]:
        """One wrk run of the client-auth scenario.

        With credentials, checked to be authenticated request by request:
        the URL without them is a 401 Basic challenge, with them a 200 (in
        ``load``), wrk saw no error status, and the mirror's login counter
        admitted at least as many logins as wrk made requests. Raises
        PullError otherwise.
        """
        headers = {**pull.MANIFEST_HEADERS, **arm.headers}
        seconds = self.settings.manifest_seconds
        connections = self.settings.manifest_connections
        if arm.authorization is None:
            return await self.load(
                arm.target,
                path,
                seconds=seconds,
                connections=connections,
                headers=headers,
            )
        url = f"{arm.target.url}{path}"
        async with (
            pull.new_session() as session,
            session.get(url, headers=pull.MANIFEST_HEADERS) as response,
        ):
            await response.read()
            pull.check_challenge(response, f"GET {url}")
        before = await logins(arm.target.url)
        wrk, upstream = await self.load(
            arm.target, path, seconds=seconds, connections=connections, headers=headers
        )
        moved = counter_delta(before, await logins(arm.target.url))
        admitted = moved.get("cached", 0) + moved.get("verified", 0)
        if wrk.errors["status"] or admitted < wrk.requests:
            raise pull.PullError(
                f"{label} on {arm.target.name}: {wrk.requests} requests, "
                f"{wrk.errors['status']} error statuses, {admitted} logins admitted: "
                "not every request was authenticated"
            )
        arm.side.logins.append({"load": label, "requests": wrk.requests, **moved})
        return wrk, upstream

    async def _auth_pulls(self, image: Published, arms: Sequence[AuthArm]) -> None:
        """Warm pulls, alternating between the arms, after one each not
        measured (a verified login, the page cache warm).

        The auth-on pulls are checked to be authenticated: each made one
        request without credentials (the ping) and had every other admitted.
        Raises PullError otherwise.
        """
        for arm in arms:
            await arm.pull_image(image)
        secured = next(arm for arm in arms if arm.authorization is not None)
        before = await logins(secured.target.url)
        pulls = self.settings.auth_pull_repeats
        for _ in range(pulls):
            for arm in arms:
                arm.side.warm_pull.append((await arm.pull_image(image)).seconds)
        moved = counter_delta(before, await logins(secured.target.url))
        # Each pull: the ping, then HEAD, GET of the manifest and the blobs.
        per_pull = 2 + len(image.single.blob_digests)
        admitted = moved.get("cached", 0) + moved.get("verified", 0)
        if moved.get("missing", 0) != pulls or admitted != pulls * per_pull:
            raise pull.PullError(
                f"{pulls} warm pulls on {secured.target.name}: logins {moved}, "
                f"expected {pulls} missing and {pulls * per_pull} admitted"
            )
        secured.side.logins.append({"load": "warm pulls", "pulls": pulls, **moved})

    def peaks(self) -> dict[str, PeakRss]:
        """Each cache's peak RSS so far: its process tree's, and for the
        cluster its three nodes' (not HAProxy's)."""
        found: dict[str, PeakRss] = {}
        for cache in self.caches:
            pid = cache.root_pid()
            if pid is not None:
                found[cache.name] = system.peak_rss(pid)
        if self.cluster is not None:
            readings: dict[int, int] = {}
            for pid in self.cluster.node_pids():
                readings.update(system.peak_rss(pid).per_process_kib)
            found[self.cluster.name] = PeakRss(readings)
        return found

    def note_memory(self, scenario: str) -> None:
        """Each cache's peak RSS so far, to tell which scenario set it."""
        for name, peak in self.peaks().items():
            self.results[name].rss_after[scenario] = peak.total_mib

    def read_memory(self) -> None:
        """Scenario 6: each cache's peak RSS, before anything is stopped."""
        for name, peak in self.peaks().items():
            self.results[name].rss = peak

    async def profile_mirror(self, image: Published) -> None:
        """py-spy on mirror during blob and manifest loads (not measured)."""
        mirror = self.mirror
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
        say(
            "starting mirror, distribution (proxy), nginx and the cluster "
            "(3 mirrors behind haproxy) with empty caches"
        )
        run.start_caches()
        names = [target.name for target in run.herd_targets]
        wan_names = [target.name for target in run.everyone]
        published = await asyncio.gather(
            *(
                run.publish(f"bench/herd-{slug(n)}", settings.herd_layers_mib)
                for n in names
            ),
            *(
                run.publish(f"bench/wan-herd-{slug(n)}", settings.herd_layers_mib)
                for n in wan_names
            ),
        )
        herd_images = dict(zip(names, published[: len(names)], strict=True))
        wan_herd_images = dict(zip(wan_names, published[len(names) :], strict=True))
        machine = system.machine(tools, REPO_ROOT)
        machine["versions"]["haproxy"] = system._version([tools["haproxy"], "-v"])
        # Let the pushes' dirty pages reach the disk now, not during a pull.
        await asyncio.to_thread(os.sync)
        scenarios = {
            "cold pull": functools.partial(run.cold_pulls, image),
            "warm pull": functools.partial(run.warm_pulls, image),
            "herd": functools.partial(run.herds, herd_images),
            "wan": functools.partial(run.wan, image, wan_herd_images),
            "cached blob": functools.partial(run.blob_throughput, image),
            "manifests": functools.partial(run.manifests, image),
            "client auth": functools.partial(run.client_auth_scenario, image),
        }
        for scenario, scenario_run in scenarios.items():
            await scenario_run()
            run.note_memory(scenario)
        if profile:
            await run.profile_mirror(image)
        run.read_memory()
        machine["load_average_at_end"] = system.load_average()
    checks = report.evaluate(run.results, run.client_auth)
    print()
    print(report.text_table(run.results))
    if run.client_auth is not None:
        print()
        print(report.auth_text_table(run.client_auth))
    print()
    print(report.checks_text(checks))
    json_path, md_path = report.write(
        out,
        machine=machine,
        settings={**dataclasses.asdict(settings), "profile": profile},
        results=run.results,
        checks=checks,
        profiles=run.profiles,
        client_auth=run.client_auth,
    )
    print(f"\nwrote {json_path} and {md_path}")


def time_bcrypt(cost: int, repeats: int = 3) -> float:
    """Seconds of one ``bcrypt.checkpw`` at ``cost`` here (median)."""
    hashed = bcrypt.hashpw(b"bench", bcrypt.gensalt(rounds=cost))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        bcrypt.checkpw(b"bench", hashed)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


async def logins(base: str) -> dict[str, int]:
    """mirror's ``mirror_client_auth_total`` by result, from its /metrics."""
    async with pull.new_session() as session, session.get(f"{base}/metrics") as got:
        text = await got.text()
        if got.status != 200:
            raise pull.PullError(f"GET {base}/metrics: HTTP {got.status}")
    return {
        sample.labels["result"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == "mirror_client_auth"
        for sample in family.samples
        if sample.name == "mirror_client_auth_total"
    }


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in sorted(after.items())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark mirror against distribution's proxy and nginx.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of everything (three of client auth): about 190 s "
        "instead of 10 minutes",
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
