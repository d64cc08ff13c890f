"""Run the soak: set up, warm up, load with faults, settle, check, report.

This module owns the order of a run and its pass/fail rules:

1. the upstream (the distribution registry, via the integration harness's
   ``Upstream``) seeded with generated blobs and images (``content``); a
   LatencyProxy in front of it (``netem``); ``mirror serve`` pointed at the
   proxy (``daemon``);
2. the idle figures (RSS, fds) once the mirror answers;
3. a warm-up: the hot blobs and manifests fetched once, then the full client
   mix for ``--warmup`` seconds without faults, then a settle; the RSS after
   it is the memory baseline (the mirror has by then grown the buffers,
   threads and allocator arenas this load needs);
4. the load: every client for ``--duration`` seconds while ``faults`` runs
   its schedule, sampled every second (``sampler``);
5. a bounded settle: until no client connection (but the scrape), no
   download and no queue are left and the fds are back within ``FD_SLACK``
   of idle, at most ``--settle`` seconds;
6. ``mirror verify`` on the cache after a SIGTERM, a look through the
   mirror's log, and the checks (``checks``, below).

Usage: ``python -m tests.bench.soak [--duration 60] [--clients 300]``; see
``--help`` and docs/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from mirror import __version__ as mirror_version
from tests.bench import system
from tests.integration.mirror_process import REPO_ROOT, mirror_environment
from tests.integration.skopeo import Skopeo
from tests.integration.tools import find_tool
from tests.integration.upstream import Upstream

from . import clients, content, faults, report
from .clients import Behaviours, Herd, Tally, World
from .daemon import MirrorSettings, SoakMirror
from .netem import ProxyProcess, Shape
from .report import Check, SoakResult
from .sampler import Sample, Sampler, fd_count, rss_mib

KiB = 1024
MiB = 1024 * KiB
# Settled fds may exceed idle by this many: the scrape's own connection,
# and a pooled upstream connection the mirror's client has not yet closed.
FD_SLACK = 4
# Settled RSS may exceed the post-warm-up baseline by this much (see
# docs/soak.md: about a fifth of the peak under load; more is a leak or
# fragmentation worth looking at).
RSS_SLACK_MIB = 30.0
# How long clients still in a request get to finish after the load ends:
# longer than a stall client's hold (2 x send_timeout + 2) plus its drain.
CLIENT_GRACE = 30.0
LOG_PATTERNS = (
    (re.compile(r"sha256:[0-9a-f]{64}"), "<digest>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "<addr>"),
    (re.compile(r"\d+(\.\d+)?"), "N"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    duration: float = 60.0
    clients: int = 300
    warmup: float = 10.0
    settle: float = 60.0
    blobs: int = 200
    images: int = 20
    min_blob: int = 4 * KiB
    max_blob: int = 8 * MiB
    seed: str = "soak"
    faults: bool = True
    mirror: MirrorSettings = dataclasses.field(default_factory=MirrorSettings)
    shape: Shape = dataclasses.field(default_factory=Shape)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def machine() -> dict[str, Any]:
    registry = find_tool("docker-registry") or "docker-registry"
    try:
        version = subprocess.run(
            [registry, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        version = f"unknown ({error})"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "load_average_at_start": system.load_average(),
        "versions": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "mirror": f"{mirror_version} ({system.git_revision(REPO_ROOT)})",
            "docker-registry": version,
        },
    }


class Soak:
    """One run's processes, clients and figures."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.tally = Tally()
        self.result = SoakResult(settings=_settings_json(settings), machine=machine())
        self.world: World | None = None
        self.sampler: Sampler | None = None
        self.stuck: collections.Counter[str] = collections.Counter()

    def phase(self) -> str:
        return "setup" if self.world is None else self.world.phase

    def set_phase(self, name: str) -> None:
        assert self.world is not None
        self.world.set_phase(name)

    def mark(self, stage: str) -> None:
        sampler = self.sampler
        if sampler is not None:
            self.result.marks[stage] = round(time.monotonic() - sampler.started, 2)

    # --- the run --------------------------------------------------------------

    async def run(self, stack: contextlib.AsyncExitStack) -> SoakResult:
        settings = self.settings
        registry = find_tool("docker-registry")
        if registry is None:
            raise SystemExit("soak: needs docker-registry (apt-get install it)")
        skopeo = Skopeo.create(find_tool("skopeo") or "skopeo", self.workdir / "skopeo")
        upstream = Upstream(
            binary=registry, skopeo=skopeo, workdir=self.workdir / "upstream"
        )
        say(f"starting the upstream registry (work directory {self.workdir})")
        await asyncio.to_thread(upstream.start)
        stack.callback(upstream.stop)
        say(f"generating {settings.blobs} blobs and pushing them")
        generated = await asyncio.to_thread(
            content.generate,
            self.workdir / "blobs",
            blobs=settings.blobs,
            images=settings.images,
            min_size=settings.min_blob,
            max_size=settings.max_blob,
            seed=settings.seed,
        )
        await content.push(upstream.url, generated)
        self.result.upstream["blob_bytes_mib"] = round(generated.total_bytes / MiB, 1)
        proxy = ProxyProcess(
            upstream.port,
            settings.shape,
            self.workdir / "proxy.log",
            seed=settings.seed,
        )
        await proxy.start()
        stack.push_async_callback(proxy.stop)
        mirror = SoakMirror(proxy.url, self.workdir / "mirror", settings.mirror)
        say("starting mirror")
        await asyncio.to_thread(mirror.start)
        stack.callback(mirror.stop)
        send_timeout = seconds(settings.mirror.send_timeout)
        self.world = World(
            host="127.0.0.1",
            port=mirror.port,
            content=generated,
            send_timeout=send_timeout,
            header_timeout=seconds(settings.mirror.header_timeout),
            tally=self.tally,
            herd=Herd(),
            seed=settings.seed,
            phase="idle",
        )
        await asyncio.sleep(1.0)
        idle_rss, idle_fds = rss_mib(mirror.pid), fd_count(mirror.pid)
        self.result.baseline.update(idle_rss_mib=idle_rss, idle_fds=idle_fds)
        assert upstream.process is not None
        self.sampler = Sampler(
            mirror.pid,
            mirror.url,
            proxy,
            self.tally,
            self.phase,
            others={
                "generator": os.getpid(),
                "proxy": proxy.pid,
                "registry": upstream.process.pid,
            },
            probe=functools.partial(clients.probe_cached, self.world, mirror.cache_dir),
        )
        self.sampler.start()
        stack.push_async_callback(self.sampler.stop)

        say("warm-up: hot blobs and manifests once, then the mix without faults")
        self.mark("warmup")
        self.set_phase("warmup")
        await self.prewarm()
        await self.load(settings.warmup, faults.NO_FAULTS, proxy, label="warmup")
        self.set_phase("settle")
        baseline = await self.settle(idle_fds or 0)
        self.result.baseline.update(
            rss_mib=baseline.rss_mib, fds=baseline.fds, settle_s=baseline.t
        )
        self.tally.counts.clear()  # the load's outcomes only from here on
        self.tally.latencies.clear()
        self.tally.close_after.clear()
        self.tally.cache_headers.clear()
        received_before = self.tally.received
        herd_before = len(self.world.herd.rounds)
        gets_before = upstream.mark()
        counters_before = await proxy.counters()

        say(f"load: {settings.clients} clients for {settings.duration:.0f} s")
        self.mark("load")
        schedule = faults.SCHEDULE if settings.faults else faults.NO_FAULTS
        self.result.faults = await self.load(settings.duration, schedule, proxy)
        self.mark("settle")
        self.set_phase("settle")
        started = time.monotonic()
        final = await self.settle(idle_fds or 0)
        self.result.final.update(
            rss_mib=final.rss_mib,
            fds=final.fds,
            connections=final.metrics.get("connections"),
            downloads=final.metrics.get("downloads"),
            queued=final.metrics.get("queued"),
            upstream_open=final.upstream_open,
            settle_s=round(time.monotonic() - started, 1),
        )
        self.mark("end")
        await self.sampler.stop()
        load_samples = [
            s for s in self.sampler.samples if s.t >= self.result.marks["load"]
        ]
        self.result.samples = self.sampler.samples
        self.result.peaks = _peaks(load_samples, mirror.pid)
        self.result.mirror["counters"] = _counters(final)
        self.result.mirror["alive_at_end"] = mirror.alive()
        counters_after = await proxy.counters()
        self.result.upstream.update(
            connections=counters_after["connections"] - counters_before["connections"],
            bytes_to_mirror_mib=round(
                (counters_after["bytes_to_client"] - counters_before["bytes_to_client"])
                / MiB,
                1,
            ),
            cuts=counters_after["cuts"] - counters_before["cuts"],
            failed_connects=counters_after["failed_connects"]
            - counters_before["failed_connects"],
        )
        log = await upstream.requests_since(gets_before)
        gets = log.blob_gets(successful=True)
        self.result.upstream.update(
            requests=len(log),
            blob_gets=sum(gets.values()),
            herd=_herd_rounds(
                self.world.herd.rounds[herd_before:],
                upstream.process.log_text(since=gets_before, limit=None),
                self.sampler.started,
            ),
        )
        self.result.outcomes = self.outcomes(self.tally.received - received_before)
        self.result.examples = list(self.tally.examples)

        say("stopping mirror, then mirror verify on its cache")
        status = await asyncio.to_thread(mirror.stop)
        self.result.mirror["exit_status"] = status
        self.result.mirror["verify"] = await verify(mirror.cache_dir)
        self.result.mirror["log"] = scan_log(mirror.log_text())
        await proxy.stop()
        self.result.upstream["proxy_errors"] = list(proxy.errors)
        self.result.machine["load_average_at_end"] = system.load_average()
        self.result.machine["load_generator_cpu_s"] = round(sum(os.times()[:2]), 1)
        self.result.checks = checks(self.result, self.stuck, self.settings)
        return self.result

    async def prewarm(self) -> None:
        """Every hot blob and every manifest once, so hits are hits."""
        world = self.world
        assert world is not None
        behaviours = Behaviours(world)
        async with clients.new_session() as session:
            for blob in world.hot:
                await behaviours.get_blob(session, "hit", blob)
            for image in world.content.images:
                url = f"{world.url}/v2/{image.repository}/manifests/{image.digest}"
                async with session.get(url) as response:
                    await response.read()

    async def load(
        self,
        duration: float,
        schedule: tuple[faults.Phase, ...],
        proxy: ProxyProcess,
        *,
        label: str | None = None,
    ) -> list[dict[str, object]]:
        """Every client for ``duration`` seconds, faults on ``schedule``;
        outcomes are counted under ``label`` if given, else the phase."""
        world = self.world
        assert world is not None
        behaviours = Behaviours(world)
        until = time.monotonic() + duration
        kinds = clients.assign(self.settings.clients)
        tasks = [
            asyncio.create_task(clients.client(kind, n, world, behaviours, until))
            for n, kind in enumerate(kinds)
        ]
        leader = asyncio.create_task(clients.herd_leader(world, until))
        done = await faults.inject(
            proxy,
            duration=duration,
            schedule=schedule,
            set_phase=self.set_phase if label is None else lambda _: None,
            seed=self.settings.seed,
        )
        if label is None:
            self.set_phase("drain")
        await leader
        _, pending = await asyncio.wait(tasks, timeout=CLIENT_GRACE)
        for task in pending:
            self.stuck[kinds[tasks.index(task)]] += 1
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                self.tally.examples.append(f"client crashed: {error!r}")
        return done

    async def settle(self, idle_fds: int) -> Sample:
        """Wait (at most ``settings.settle`` s) until three samples in a row
        are quiet; return the last sample either way."""
        sampler = self.sampler
        assert sampler is not None
        deadline = time.monotonic() + self.settings.settle
        seen = len(sampler.samples)
        quiet = 0
        while time.monotonic() < deadline and quiet < 3:
            await asyncio.sleep(0.2)
            if len(sampler.samples) == seen:
                continue
            seen = len(sampler.samples)
            latest = sampler.samples[-1]
            quiet = quiet + 1 if _quiet(latest, idle_fds) else 0
        last = sampler.latest
        assert last is not None
        return last

    def outcomes(self, received: int) -> dict[str, Any]:
        tally = self.tally
        by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
        by_phase: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (phase, kind, outcome), count in sorted(tally.counts.items()):
            by_kind[kind][outcome] = by_kind[kind].get(outcome, 0) + count
            by_phase[phase][outcome] = by_phase[phase].get(outcome, 0) + count
        latency = {}
        for kind, values in sorted(tally.latencies.items()):
            ordered = sorted(values)
            latency[kind] = {
                "p50": statistics.median(ordered),
                "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                "max": ordered[-1],
            }
        return {
            "clients": dict(collections.Counter(clients.assign(self.settings.clients))),
            "requests": sum(tally.counts.values()),
            "by_outcome": dict(tally.by_outcome().most_common()),
            "by_kind": {k: by_kind[k] for k in clients.KINDS if k in by_kind},
            "by_phase": dict(by_phase),
            "cache_headers": {
                f"{kind} {value}": n for (kind, value), n in tally.cache_headers.items()
            },
            "latency": latency,
            "closed_max_s": {
                variant: round(max(values), 2)
                for variant, values in tally.close_after.items()
            },
            "closed_median_s": {
                variant: round(statistics.median(values), 2)
                for variant, values in tally.close_after.items()
            },
            "stuck_clients": dict(self.stuck),
            "received_mib": received / MiB,
        }


def _quiet(sample: Sample, idle_fds: int) -> bool:
    metrics = sample.metrics
    connections = metrics.get("connections")
    return (
        connections is not None
        and connections <= 1
        and metrics.get("downloads") == 0
        and metrics.get("queued") == 0
        and sample.fds is not None
        and sample.fds <= idle_fds + FD_SLACK
    )


def _peaks(samples: list[Sample], pid: int) -> dict[str, Any]:
    def peak(values: list[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return max(present) if present else None

    hwm = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    loaded = [s for s in samples if s.phase not in ("drain", "settle")]
    cpu_mean = {
        "mirror": _mean([s.cpu_percent for s in loaded]),
        **{
            name: _mean([s.cpu_others.get(name) for s in loaded])
            for name in (loaded[0].cpu_others if loaded else {})
        },
    }
    return {
        "rss_drift_mib_per_min": _slope(
            [(s.t, s.rss_mib) for s in loaded if s.rss_mib is not None]
        ),
        "cpu_mean": cpu_mean,
        "rss_mib": peak([s.rss_mib for s in samples]),
        "vmhwm_mib": hwm,
        "fds": peak([s.fds for s in samples]),
        "threads": peak([s.threads for s in samples]),
        "connections": peak([s.metrics.get("connections") for s in samples]),
        "downloads": peak([s.metrics.get("downloads") for s in samples]),
        "queued": peak([s.metrics.get("queued") for s in samples]),
        "cpu_percent": peak([s.cpu_percent for s in samples]),
    }


ACCESS_TIME = re.compile(
    r'^\S+ \S+ \S+ \[(?P<time>[^\]]*)\] "(?P<method>[A-Z]+) (?P<uri>\S+) '
    r'HTTP/[\d.]+" (?P<status>\d{3})'
)


def _blob_gets(log_text: str) -> list[tuple[float, str, int]]:
    """(wall time, digest, status) of every blob GET in a registry log.

    The integration harness's RequestLog has no times, and herd blobs are
    used again once a long run has cycled through them: the time tells
    which round a GET belongs to. The log has whole seconds.
    """
    gets = []
    for line in log_text.splitlines():
        match = ACCESS_TIME.match(line)
        if match is None or match["method"] != "GET" or "/blobs/" not in match["uri"]:
            continue
        when = datetime.datetime.strptime(match["time"], "%d/%b/%Y:%H:%M:%S %z")
        digest = match["uri"].partition("?")[0].rpartition("/")[2]
        gets.append((when.timestamp(), digest, int(match["status"])))
    return gets


def _herd_rounds(
    rounds: list[dict[str, object]], log_text: str, started: float
) -> dict[str, Any]:
    """Per herd round: the upstream GETs of its blob, whole (200) and
    resumed (206), each GET counted under the last round of its blob that
    began before it (less a second: the log has whole seconds)."""
    counts: list[collections.Counter[int]] = [collections.Counter() for _ in rounds]
    for when, digest, status in _blob_gets(log_text):
        owner = None
        for number, herd_round in enumerate(rounds):
            wall = herd_round["wall"]
            assert isinstance(wall, float)
            if herd_round["digest"] == digest and wall - 1.0 <= when:
                owner = number
        if owner is not None:
            counts[owner][status] += 1
    detail = []
    for herd_round, statuses in zip(rounds, counts, strict=True):
        at = herd_round["at"]
        assert isinstance(at, float)
        detail.append(
            {
                "t": round(at - started, 1),
                "phase": herd_round["phase"],
                "clients": herd_round["clients"],
                "whole_gets": statuses[200],
                "resumed_gets": statuses[206],
                "other": {
                    str(k): v for k, v in statuses.items() if k not in (200, 206)
                },
            }
        )
    whole = collections.Counter(round_["whole_gets"] for round_ in detail)
    return {
        "rounds": len(detail),
        "rounds_by_whole_gets": {str(k): v for k, v in sorted(whole.items())},
        "detail": detail,
    }


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.fmean(present), 1) if present else None


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of RSS over time, in MiB per minute."""
    if len(points) < 3:
        return None
    slope, _ = statistics.linear_regression(
        [t for t, _ in points], [value for _, value in points]
    )
    return round(slope * 60, 2)


def _counters(sample: Sample) -> dict[str, float | None]:
    names = ("send_timeouts", "evictions", "resumes", "verification_failures")
    return {name: sample.metrics.get(name) for name in (*names, "rejected")}


async def verify(cache_dir: Path) -> dict[str, Any]:
    """``mirror verify --json`` on the (stopped) mirror's cache."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        "verify",
        "--cache-dir",
        str(cache_dir),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=mirror_environment(),
    )
    out, err = await process.communicate()
    try:
        parsed: Any = json.loads(out)
    except ValueError:
        parsed = None
    return {
        "exit_status": process.returncode,
        "report": parsed,
        "stderr_tail": err.decode("utf-8", "replace")[-2000:],
    }


def scan_log(text: str) -> dict[str, Any]:
    """Tracebacks, and the ERROR and WARNING lines grouped by their shape."""
    levels: dict[str, collections.Counter[str]] = {
        "ERROR": collections.Counter(),
        "WARNING": collections.Counter(),
        "CRITICAL": collections.Counter(),
    }
    tracebacks = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("Traceback"):
            tracebacks.append("\n".join(lines[max(0, number - 2) : number + 30]))
        parts = line.split(" ", 4)
        if len(parts) == 5 and parts[2] in levels:
            message = parts[4]
            for pattern, replacement in LOG_PATTERNS:
                message = pattern.sub(replacement, message)
            levels[parts[2]][f"{parts[3]} {message}"] += 1
    return {
        "lines": len(lines),
        "tracebacks": len(tracebacks),
        "first_tracebacks": tracebacks[:3],
        **{
            level.lower(): dict(counter.most_common(15))
            for level, counter in levels.items()
        },
    }


def checks(
    result: SoakResult, stuck: collections.Counter[str], settings: Settings
) -> list[Check]:
    outcomes = result.outcomes
    by_outcome = outcomes["by_outcome"]
    base, final = result.baseline, result.final
    verify_result = result.mirror["verify"]
    verify_report = verify_result.get("report") or {}
    log = result.mirror["log"]
    counters = result.mirror["counters"]
    idle_fds = base.get("idle_fds") or 0
    rss_limit = (base.get("rss_mib") or 0) + RSS_SLACK_MIB
    kinds_ok = {
        kind: per.get(clients.OK, 0)
        + per.get(clients.CUT, 0)
        + per.get(clients.LEFT, 0)
        + per.get(clients.CLOSED, 0)
        for kind, per in outcomes["by_kind"].items()
    }
    idle_kinds = [kind for kind in clients.KINDS if not kinds_ok.get(kind)]
    exercised = {
        "queue": (result.peaks.get("queued") or 0) > 0,
        "eviction": (counters.get("evictions") or 0) > 0,
        "send timeouts": (counters.get("send_timeouts") or 0) > 0,
    }
    if settings.faults:
        exercised["resumes"] = (counters.get("resumes") or 0) > 0
    return [
        Check(
            "no wrong bytes",
            by_outcome.get(clients.MISMATCH, 0) == 0,
            f"{by_outcome.get(clients.MISMATCH, 0)} complete bodies with wrong "
            f"bytes of {outcomes['requests']} requests",
        ),
        Check(
            "stalled clients dropped",
            by_outcome.get(clients.NOT_CUT, 0) == 0,
            f"{by_outcome.get(clients.NOT_CUT, 0)} of "
            f"{sum(outcomes['by_kind'].get('stall', {}).values())} stalled "
            f"clients kept (send_timeouts counted: {counters.get('send_timeouts')})",
        ),
        Check(
            "slow clients closed",
            by_outcome.get(clients.NOT_CLOSED, 0) == 0,
            f"{by_outcome.get(clients.NOT_CLOSED, 0)} kept open past "
            f"3x header_timeout; closed after (max) {outcomes['closed_max_s']}",
        ),
        Check(
            "clients finished",
            not stuck,
            f"{sum(stuck.values())} clients still in a request "
            f"{CLIENT_GRACE:.0f} s after the load ended {dict(stuck)}",
        ),
        Check(
            "mirror settled",
            final.get("connections") is not None
            and (final.get("connections") or 0) <= 1
            and final.get("downloads") == 0
            and final.get("queued") == 0,
            f"{final.get('connections')} connections (1 is the scrape), "
            f"{final.get('downloads')} downloads, {final.get('queued')} queued "
            f"after {final.get('settle_s')} s",
        ),
        Check(
            "fds back to idle",
            final.get("fds") is not None and final["fds"] <= idle_fds + FD_SLACK,
            f"{final.get('fds')} fds settled, idle {idle_fds} "
            f"(limit idle + {FD_SLACK})",
        ),
        Check(
            "memory back to baseline",
            final.get("rss_mib") is not None and final["rss_mib"] <= rss_limit,
            f"{_mib(final.get('rss_mib'))} settled vs {_mib(base.get('rss_mib'))} "
            f"after warm-up (limit +{RSS_SLACK_MIB:.0f} MiB); peak "
            f"{_mib(result.peaks.get('rss_mib'))}",
        ),
        Check(
            "mirror alive, clean exit",
            bool(result.mirror.get("alive_at_end"))
            and result.mirror.get("exit_status") == 0,
            f"alive at the end: {result.mirror.get('alive_at_end')}, exit status "
            f"{result.mirror.get('exit_status')} on SIGTERM",
        ),
        Check(
            "mirror verify clean",
            verify_result.get("exit_status") == 0
            and not verify_report.get("removed")
            and not verify_report.get("rows_dropped"),
            f"exit {verify_result.get('exit_status')}: "
            f"{verify_report.get('checked')} blobs checked, "
            f"{len(verify_report.get('removed') or [])} bad, "
            f"{verify_report.get('rows_dropped')} rows without a file, "
            f"{verify_report.get('adopted')} files adopted",
        ),
        Check(
            "no traceback in the mirror log",
            log["tracebacks"] == 0 and not log["critical"],
            f"{log['tracebacks']} tracebacks, {sum(log['error'].values())} ERROR "
            f"lines in {log['lines']} lines",
        ),
        Check(
            "proxy relayed cleanly",
            not result.upstream.get("proxy_errors"),
            f"{len(result.upstream.get('proxy_errors') or [])} LatencyProxy errors",
        ),
        Check(
            "load exercised everything",
            not idle_kinds and all(exercised.values()),
            f"kinds with no expected outcome: {idle_kinds or 'none'}; "
            + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in exercised.items()),
        ),
    ]


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def _settings_json(settings: Settings) -> dict[str, Any]:
    data = dataclasses.asdict(settings)
    data["schedule"] = [
        {"at_s": at, "phase": name}
        for at, name in faults.timeline(
            settings.duration, faults.SCHEDULE if settings.faults else faults.NO_FAULTS
        )
    ]
    return data


async def soak(settings: Settings, workdir: Path) -> SoakResult:
    run = Soak(settings, workdir)
    async with contextlib.AsyncExitStack() as stack:
        return await run.run(stack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.soak",
        description="Soak mirror: hundreds of clients, upstream faults, "
        "memory/fd/queue sampling, checks.",
    )
    defaults = Settings()
    parser.add_argument(
        "--duration", type=float, default=defaults.duration, help="load seconds"
    )
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup,
        help="seconds of fault-free load before the memory baseline",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=defaults.settle,
        help="longest wait for the mirror to settle after a load",
    )
    parser.add_argument("--blobs", type=int, default=defaults.blobs)
    parser.add_argument("--seed", default=defaults.seed)
    parser.add_argument(
        "--no-faults", action="store_true", help="the shaped network, no faults"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench-results",
        help="where soak.json and soak.md go",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, cache)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dataclasses.replace(
        Settings(),
        duration=args.duration,
        clients=args.clients,
        warmup=args.warmup,
        settle=args.settle,
        blobs=args.blobs,
        seed=args.seed,
        faults=not args.no_faults,
    )
    # Every client may hold a connection or two; stay clear of the soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="mirror-soak-"))
    started = time.monotonic()
    keep = args.keep
    try:
        result = asyncio.run(soak(settings, workdir))
    except Exception:  # noqa: BLE001 - reported, and the work kept for a look
        traceback.print_exc()
        say(f"soak failed to run; work directory kept: {workdir}")
        return 2
    print()
    print(report.table(result.samples, origin=result.marks.get("load", 0.0)))
    print(report.LEGEND)
    print()
    print(report.summary(result))
    print()
    for example in result.examples[:15]:
        print(f"  example: {example}")
    for check in result.checks:
        print(check.line())
    json_path, md_path = report.write(args.out, result)
    print(f"\nwrote {json_path} and {md_path}")
    if not result.passed:
        keep = True
    if keep:
        say(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0 if result.passed else 1
