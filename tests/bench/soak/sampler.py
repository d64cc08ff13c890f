"""Once a second: the mirror's memory, fds, CPU and gauges, and the clients'
outcomes since the last sample.

This module owns ``Sample`` and ``Sampler``. Process figures come from
``/proc/<pid>`` (``VmRSS`` and ``Threads`` from ``status``, the entries of
``fd``, CPU time from ``stat``); the mirror's own view from ``GET
/metrics`` on a fresh connection each time (so the scrape is the one
connection it sees of ours: ``mirror_http_connections`` is at least 1
while it answers); the upstream traffic from the proxy's counters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .clients import EXPECTED, FAILURES, RESET, TIMEOUT, UNAVAILABLE, Tally
from .netem import ProxyError, ProxyProcess

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The /metrics series sampled, by the name used here.
SERIES = {
    "queued": "mirror_blob_downloads_queued",
    "downloads": "mirror_blob_downloads_in_progress",
    "connections": "mirror_http_connections",
    "send_timeouts": "mirror_http_send_timeouts_total",
    "cache_bytes": "mirror_cache_size_bytes",
    "evictions": "mirror_evictions_total",
    "resumes": "mirror_blob_resumes_total",
    "verification_failures": "mirror_verification_failures_total",
    "upstream_up": "mirror_upstream_up",
    "rejected": "mirror_http_connections_rejected_total",
}
# Outcome columns of the time series: what was expected, the failures
# upstream faults explain, and what must never happen.
GROUPS = {
    "ok": EXPECTED,
    "503": (UNAVAILABLE,),
    "reset": (RESET,),
    "timeout": (TIMEOUT,),
    "bad": FAILURES,
}


@dataclass
class Sample:
    t: float
    """Seconds since the sampler started."""
    phase: str
    rss_mib: float | None
    fds: int | None
    threads: int | None
    cpu_percent: float | None
    metrics: dict[str, float | None]
    upstream_mb_s: float | None
    """Response bytes the proxy delivered to the mirror, per second."""
    upstream_open: int | None
    """Connections open between mirror and upstream (through the proxy)."""
    client_mb_s: float
    scrape_ms: float | None
    """How long GET /metrics took (the load generator's loop lag included)."""
    lag_ms: float | None
    """The load generator's event loop lag: the longest oversleep of a
    50 ms sleep in the interval. What the client-side times include."""
    probe_ms: float | None
    """How long a GET of one blob that was in the cache took (None: failed
    or nothing cached); ``probe_cache`` is its X-Mirror-Cache."""
    probe_cache: str
    outcomes: dict[str, int] = field(default_factory=dict)
    """Outcome group -> requests finished since the last sample."""
    cpu_others: dict[str, float | None] = field(default_factory=dict)
    """CPU (% of one core) of the other processes: the load generator, the
    proxy, the registry; they share the machine's cores with the mirror."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rss_mib(pid: int) -> float | None:
    kib = _status_field(pid, "VmRSS")
    return None if kib is None else kib / 1024


def _status_field(pid: int, key: str) -> int | None:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of the exposition, summed over labels, by sample name."""
    values: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] += sample.value
    return values


async def scrape(url: str, *, within: float = 3.0) -> dict[str, float] | None:
    """The mirror's metrics, or None if it did not answer in time."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=within),
                trust_env=False,
            ) as session,
            session.get(f"{url}/metrics") as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return parse_metrics(text)


async def _timed(
    work: Coroutine[Any, Any, dict[str, float] | None],
) -> tuple[dict[str, float] | None, float]:
    started = time.monotonic()
    result = await work
    return result, time.monotonic() - started


class Sampler:
    """Takes a ``Sample`` every ``interval`` seconds until stopped."""

    def __init__(
        self,
        pid: int,
        url: str,
        proxy: ProxyProcess,
        tally: Tally,
        phase: Any,
        *,
        others: dict[str, int] | None = None,
        probe: Callable[[], Coroutine[Any, Any, tuple[float | None, str]]]
        | None = None,
        interval: float = 1.0,
    ) -> None:
        self.pid = pid
        self.url = url
        self.proxy = proxy
        self.tally = tally
        self._phase = phase  # a callable returning the current phase name
        self.interval = interval
        self.others = others or {}
        self.probe = probe
        self._lag_max = 0.0
        self._lag_task: asyncio.Task[None] | None = None
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self._last: dict[str, float] = {}
        self._last_outcomes: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run())
        self._lag_task = asyncio.create_task(self._watch_lag())

    async def stop(self) -> None:
        for task in (self._task, self._lag_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            self._lag_max = max(self._lag_max, time.monotonic() - before - 0.05)

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            self.samples.append(await self.take())
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def take(self) -> Sample:
        # Everything that is a rate is read first and at once, so that the
        # interval it is divided by is the interval it was counted over; the
        # slow parts (the scrape, the probe) come after.
        now = time.monotonic()
        elapsed = now - self._last.get("at", now - self.interval)
        self._last["at"] = now
        cpu = self._rate("cpu", cpu_seconds(self.pid), elapsed, 100.0)
        others = {
            name: self._rate(f"cpu {name}", cpu_seconds(pid), elapsed, 100.0)
            for name, pid in self.others.items()
        }
        client = self._rate("client", self.tally.received, elapsed, 1e-6)
        outcomes = self._outcomes()
        lag, self._lag_max = self._lag_max, 0.0
        rss, fds = rss_mib(self.pid), fd_count(self.pid)
        threads = _status_field(self.pid, "Threads")
        try:
            counters: dict[str, int] | None = await self.proxy.counters()
        except ProxyError:
            counters = None
        metrics, scrape_seconds = await _timed(scrape(self.url))
        # After the scrape, not beside it: its connection must not show in
        # the scrape's mirror_http_connections.
        probe_ms, probe_cache = (None, "") if self.probe is None else await self.probe()
        return Sample(
            t=round(now - self.started, 2),
            phase=self._phase(),
            rss_mib=rss,
            fds=fds,
            threads=threads,
            cpu_percent=cpu,
            metrics={
                name: None if metrics is None else metrics.get(series)
                for name, series in SERIES.items()
            },
            upstream_mb_s=self._rate(
                "upstream",
                None if counters is None else counters["bytes_to_client"],
                elapsed,
                1e-6,
            ),
            upstream_open=None if counters is None else counters["open"],
            client_mb_s=client or 0.0,
            scrape_ms=None if metrics is None else round(scrape_seconds * 1000, 1),
            lag_ms=round(lag * 1000, 1),
            probe_ms=probe_ms,
            probe_cache=probe_cache,
            outcomes=outcomes,
            cpu_others=others,
        )

    def _rate(
        self, name: str, value: float | None, elapsed: float, scale: float
    ) -> float | None:
        """The per-second change of ``value`` since the last sample, scaled."""
        if value is None:
            return None
        last = self._last.get(name)
        self._last[name] = value
        if last is None or elapsed <= 0:
            return None
        return round((value - last) / elapsed * scale, 1)

    def _outcomes(self) -> dict[str, int]:
        totals = self.tally.by_outcome()
        delta = totals - self._last_outcomes
        self._last_outcomes = totals
        grouped = {
            group: sum(delta[outcome] for outcome in outcomes)
            for group, outcomes in GROUPS.items()
        }
        grouped["other"] = sum(delta.values()) - sum(grouped.values())
        return grouped
