"""Results of one benchmark run: the table, the target checks, the files.

This module owns what a run produces from its measurements: ``Results``
(every number per target, JSON-ready), the target checks from issue 5 each
evaluated to PASS or FAIL, the plain-text table printed at the end, and the
files written to the output directory (``results.json`` and a Markdown
``results.md`` ready to paste into docs/benchmarks.md).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .system import PeakRss
from .wrk import WrkResult

COLD_LIMIT = 1.2
MANIFEST_FACTOR = 5.0


@dataclass
class Herd:
    seconds: float
    client_seconds: tuple[float, ...]
    blobs: int
    upstream_blob_gets: dict[str, int]
    upstream_manifest_requests: int

    @property
    def total_blob_gets(self) -> int:
        return sum(self.upstream_blob_gets.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": len(self.client_seconds),
            "seconds": round(self.seconds, 3),
            "client_seconds_median": round(statistics.median(self.client_seconds), 3),
            "client_seconds_max": round(max(self.client_seconds), 3),
            "blobs": self.blobs,
            "upstream_blob_gets": self.total_blob_gets,
            "upstream_blob_gets_by_digest": self.upstream_blob_gets,
            "upstream_manifest_requests": self.upstream_manifest_requests,
        }


@dataclass
class Load:
    """Rounds of one wrk load against one target, and what reached upstream.

    Rounds of all targets alternate, so a burst of other work on a shared
    machine hits one round of each rather than all rounds of one target;
    the median round is the result.
    """

    rounds: list[WrkResult] = field(default_factory=list)
    upstream_requests: int = 0

    def add(self, wrk: WrkResult, upstream_requests: int) -> None:
        self.rounds.append(wrk)
        self.upstream_requests += upstream_requests

    @property
    def wrk(self) -> WrkResult:
        """The median round (by requests per second; same URL, same bytes)."""
        ordered = sorted(self.rounds, key=lambda r: r.requests_per_second)
        return ordered[len(ordered) // 2]

    @property
    def error_count(self) -> int:
        return sum(r.error_count for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.wrk.to_json(),
            "upstream_requests": self.upstream_requests,
            "rounds": [r.to_json() for r in self.rounds],
        }


@dataclass
class TargetResults:
    name: str
    cold_pull: list[float] = field(default_factory=list)
    warm_pull: list[float] = field(default_factory=list)
    herd: Herd | None = None
    blob: Load | None = None
    manifest_digest: Load | None = None
    manifest_tag: Load | None = None
    rss: PeakRss | None = None
    rss_after: dict[str, float] = field(default_factory=dict)
    """The peak so far (MiB, sum of the tree) after each scenario."""

    @property
    def cold(self) -> float | None:
        return statistics.median(self.cold_pull) if self.cold_pull else None

    @property
    def warm(self) -> float | None:
        return statistics.median(self.warm_pull) if self.warm_pull else None

    def to_json(self) -> dict[str, Any]:
        def load(value: Load | None) -> dict[str, Any] | None:
            return None if value is None else value.to_json()

        return {
            "cold_pull_seconds": [round(s, 3) for s in self.cold_pull],
            "cold_pull_median": _round(self.cold),
            "warm_pull_seconds": [round(s, 3) for s in self.warm_pull],
            "warm_pull_median": _round(self.warm),
            "herd": None if self.herd is None else self.herd.to_json(),
            "blob_throughput": load(self.blob),
            "manifest_by_digest": load(self.manifest_digest),
            "manifest_by_tag": load(self.manifest_tag),
            "peak_rss": None if self.rss is None else self.rss.to_json(),
            "peak_rss_mib_after": {k: round(v, 1) for k, v in self.rss_after.items()},
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None
    """None: not evaluated (a target or a measurement is missing)."""
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "result": self.verdict, "detail": self.detail}


Verdict = tuple[bool, str]
Pick = Callable[[TargetResults], Load | None]


def _cold(mirror: TargetResults, direct: TargetResults) -> Verdict | None:
    if mirror.cold is None or direct.cold is None:
        return None
    ratio = mirror.cold / direct.cold
    return ratio <= COLD_LIMIT, (
        f"mirror {mirror.cold:.2f} s vs direct {direct.cold:.2f} s "
        f"= {ratio:.2f}x (limit {COLD_LIMIT}x)"
    )


def _throughput(mirror: TargetResults, nginx: TargetResults) -> Verdict | None:
    if mirror.blob is None or nginx.blob is None:
        return None
    ours, theirs = mirror.blob.wrk.mb_per_second, nginx.blob.wrk.mb_per_second
    return ours >= theirs, (
        f"mirror {ours:.0f} MB/s vs nginx {theirs:.0f} MB/s = {ours / theirs:.2f}x"
    )


def _herd_gets(mirror: TargetResults) -> Verdict | None:
    herd = mirror.herd
    if herd is None:
        return None
    once = len(herd.upstream_blob_gets) == herd.blobs and set(
        herd.upstream_blob_gets.values()
    ) == {1}
    return once, (
        f"{herd.total_blob_gets} upstream blob GETs for {herd.blobs} blobs "
        f"({len(herd.client_seconds)} clients)"
    )


def _herd_time(mirror: TargetResults, direct: TargetResults) -> Verdict | None:
    if mirror.herd is None or direct.herd is None:
        return None
    ours, theirs = mirror.herd.seconds, direct.herd.seconds
    return ours <= theirs, (
        f"mirror {ours:.2f} s vs direct {theirs:.2f} s = {ours / theirs:.2f}x"
    )


def _manifests(
    mirror: TargetResults, dist: TargetResults, pick: Pick
) -> Verdict | None:
    ours_load, theirs_load = pick(mirror), pick(dist)
    if ours_load is None or theirs_load is None:
        return None
    ours = ours_load.wrk.requests_per_second
    theirs = theirs_load.wrk.requests_per_second
    return ours >= MANIFEST_FACTOR * theirs, (
        f"mirror {ours:.0f} req/s vs distribution {theirs:.0f} req/s "
        f"= {ours / theirs:.1f}x (target {MANIFEST_FACTOR:g}x)"
    )


def _memory(mirror: TargetResults, dist: TargetResults) -> Verdict | None:
    if mirror.rss is None or dist.rss is None:
        return None
    ours, theirs = mirror.rss.total_mib, dist.rss.total_mib
    return ours <= theirs, f"mirror {ours:.0f} MiB vs distribution {theirs:.0f} MiB"


def evaluate(results: dict[str, TargetResults]) -> list[Check]:
    """The issue's targets for mirror, each against its reference."""
    empty = TargetResults("missing")
    mirror = results.get("mirror", empty)
    direct = results.get("direct", empty)
    dist = results.get("distribution", empty)
    nginx = results.get("nginx", empty)
    verdicts: list[tuple[str, Verdict | None]] = [
        (f"cold pull <= {COLD_LIMIT}x direct", _cold(mirror, direct)),
        ("cached blob throughput >= nginx", _throughput(mirror, nginx)),
        ("herd: one upstream GET per blob", _herd_gets(mirror)),
        ("herd: total time <= direct", _herd_time(mirror, direct)),
        (
            f"manifests by digest: req/s >= {MANIFEST_FACTOR:g}x distribution",
            _manifests(mirror, dist, lambda r: r.manifest_digest),
        ),
        (
            f"manifests by tag: req/s >= {MANIFEST_FACTOR:g}x distribution",
            _manifests(mirror, dist, lambda r: r.manifest_tag),
        ),
        ("peak RSS <= distribution", _memory(mirror, dist)),
    ]
    return [
        Check(name, None, "not measured")
        if verdict is None
        else Check(name, verdict[0], verdict[1])
        for name, verdict in verdicts
    ]


# --- the table ------------------------------------------------------------------

Row = tuple[str, Callable[[TargetResults], str]]


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _load(pick: Pick, pattern: str, metric: str) -> Callable[[TargetResults], str]:
    def cell(result: TargetResults) -> str:
        load = pick(result)
        if load is None:
            return "-"
        value = getattr(load.wrk, metric)
        text = pattern.format(value)
        if load.error_count:
            text += f" ({load.error_count} errors)"
        return text

    return cell


def _herd_cell(
    pattern: str, metric: Callable[[Herd], float]
) -> Callable[[TargetResults], str]:
    return lambda r: "-" if r.herd is None else pattern.format(metric(r.herd))


def _upstream(pick: Pick) -> Callable[[TargetResults], str]:
    def cell(result: TargetResults) -> str:
        load = pick(result)
        return "-" if load is None else str(load.upstream_requests)

    return cell


ROWS: list[Row] = [
    ("cold pull, s (median)", lambda r: _fmt(r.cold, "{:.2f}")),
    ("warm pull, s (median)", lambda r: _fmt(r.warm, "{:.2f}")),
    ("herd: total time, s", _herd_cell("{:.2f}", lambda h: h.seconds)),
    ("herd: upstream blob GETs", _herd_cell("{:.0f}", lambda h: h.total_blob_gets)),
    (
        "herd: upstream manifest reqs",
        _herd_cell("{:.0f}", lambda h: h.upstream_manifest_requests),
    ),
    ("cached blob, MB/s", _load(lambda r: r.blob, "{:.0f}", "mb_per_second")),
    (
        "manifest by digest, req/s",
        _load(lambda r: r.manifest_digest, "{:.0f}", "requests_per_second"),
    ),
    (
        "manifest by tag, req/s",
        _load(lambda r: r.manifest_tag, "{:.0f}", "requests_per_second"),
    ),
    ("  upstream reqs during by-tag", _upstream(lambda r: r.manifest_tag)),
    (
        "manifest by digest, p99 ms",
        _load(lambda r: r.manifest_digest, "{:.1f}", "latency_p99_ms"),
    ),
    (
        "peak RSS, MiB (sum of tree)",
        lambda r: _fmt(None if r.rss is None else r.rss.total_mib, "{:.0f}"),
    ),
]


def table_cells(results: dict[str, TargetResults]) -> list[list[str]]:
    names = list(results)
    cells = [["", *names]]
    for label, cell in ROWS:
        cells.append([label, *(cell(results[name]) for name in names)])
    return cells


def text_table(results: dict[str, TargetResults]) -> str:
    cells = table_cells(results)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for number, row in enumerate(cells):
        first = row[0].ljust(widths[0])
        rest = [
            value.rjust(width) for value, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join([first, *rest]))
        if number == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(results: dict[str, TargetResults]) -> str:
    cells = table_cells(results)
    lines = [
        "| " + " | ".join(cells[0]) + " |",
        "| --- |" + " ---: |" * (len(cells[0]) - 1),
    ]
    lines += [
        "| " + " | ".join(cell.strip() for cell in row) + " |" for row in cells[1:]
    ]
    return "\n".join(lines)


def checks_text(checks: list[Check]) -> str:
    return "\n".join(f"{c.verdict}  {c.name}: {c.detail}" for c in checks)


def write(
    out: Path,
    *,
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, TargetResults],
    checks: list[Check],
    profiles: dict[str, Any],
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` to ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine,
        "settings": settings,
        "targets": {name: result.to_json() for name, result in results.items()},
        "checks": [check.to_json() for check in checks],
        "profiles": profiles,
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    versions = machine["versions"]
    markdown = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, "
        f"load average at start {machine['load_average_at_start']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        markdown_table(results),
        "",
        *(f"- **{c.verdict}** {c.name}: {c.detail}" for c in checks),
        "",
    ]
    md_path = out / "results.md"
    md_path.write_text("\n".join(markdown))
    return json_path, md_path
