"""The soak's output: a time series table, a summary, the checks, JSON.

This module owns presentation and the pass/fail rules' wording; the
numbers come from ``run`` (``SoakResult``). ``table`` renders the samples
(every one on the terminal, every fifth in the Markdown), ``summary`` the
totals, ``write`` the JSON (everything, every sample) and the Markdown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sampler import Sample

COLUMNS = (
    ("t", 5),
    ("phase", 11),
    ("rss", 5),
    ("fds", 4),
    ("cpu%", 4),
    ("gen%", 4),
    ("px%", 4),
    ("conns", 5),
    ("dl", 3),
    ("queue", 5),
    ("up MB/s", 7),
    ("cli MB/s", 8),
    ("scrape", 6),
    ("lag", 4),
    ("probe", 6),
    ("ok", 4),
    ("503", 4),
    ("reset", 5),
    ("tmo", 3),
    ("other", 5),
    ("bad", 3),
    ("sendto", 6),
    ("evict", 5),
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class SoakResult:
    """Everything a run found; ``run`` fills it in."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    """Sampler time at which each stage began (warmup, load, settle...)."""
    baseline: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    peaks: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, object]] = field(default_factory=list)
    mirror: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "settings": self.settings,
            "machine": self.machine,
            "marks": self.marks,
            "baseline": self.baseline,
            "final": self.final,
            "peaks": self.peaks,
            "outcomes": self.outcomes,
            "faults": self.faults,
            "mirror": self.mirror,
            "upstream": self.upstream,
            "examples": self.examples,
            "checks": [check.__dict__ for check in self.checks],
            "samples": [sample.to_json() for sample in self.samples],
        }


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _rows(samples: Sequence[Sample], every: int, origin: float) -> list[list[str]]:
    """One row per ``every`` samples; counts summed over the group, levels
    (RSS, fds, gauges) from its last sample, rates averaged; ``t`` counted
    from ``origin`` (the start of the load), the phases the group saw."""
    rows = []
    previous: Sample | None = None
    for start in range(0, len(samples), every):
        group = samples[start : start + every]
        last = group[-1]

        def total(name: str, group: Sequence[Sample] = group) -> int:
            return sum(sample.outcomes.get(name, 0) for sample in group)

        def mean(values: list[float | None]) -> float | None:
            present = [value for value in values if value is not None]
            return sum(present) / len(present) if present else None

        def max_of(values: list[float | None]) -> float | None:
            present = [value for value in values if value is not None]
            return max(present) if present else None

        def grew(
            name: str, last: Sample = last, before: Sample | None = previous
        ) -> str:
            now = last.metrics.get(name)
            if now is None:
                return "-"
            was = 0.0 if before is None else before.metrics.get(name) or 0.0
            return f"{now - was:.0f}"

        rows.append(
            [
                f"{last.t - origin:.0f}",
                "/".join(dict.fromkeys(sample.phase for sample in group)),
                _num(last.rss_mib),
                _num(last.fds),
                _num(mean([s.cpu_percent for s in group])),
                _num(mean([s.cpu_others.get("generator") for s in group])),
                _num(mean([s.cpu_others.get("proxy") for s in group])),
                _num(last.metrics.get("connections")),
                _num(last.metrics.get("downloads")),
                _num(last.metrics.get("queued")),
                _num(mean([s.upstream_mb_s for s in group]), 1),
                _num(mean([s.client_mb_s for s in group]), 1),
                _num(max_of([s.scrape_ms for s in group])),
                _num(max_of([s.lag_ms for s in group])),
                _probe(group),
                str(total("ok")),
                str(total("503")),
                str(total("reset")),
                str(total("timeout")),
                str(total("other")),
                str(total("bad")),
                grew("send_timeouts"),
                grew("evictions"),
            ]
        )
        previous = last
    return rows


def _probe(group: Sequence[Sample]) -> str:
    """The slowest probe of the group; "*" if it was not a hit, "x" if it
    failed."""
    worst: Sample | None = None
    for sample in group:
        if sample.probe_ms is None:
            if sample.probe_cache != "none cached":
                return "x"
            continue
        if worst is None or (worst.probe_ms or 0) < sample.probe_ms:
            worst = sample
    if worst is None or worst.probe_ms is None:
        return "-"
    return f"{worst.probe_ms:.0f}" + ("" if worst.probe_cache == "hit" else "*")


def table(samples: Sequence[Sample], *, every: int = 1, origin: float = 0.0) -> str:
    """The time series as fixed-width text."""
    widths = [max(width, len(name)) for name, width in COLUMNS]
    lines = [
        " ".join(name.rjust(w) for (name, _), w in zip(COLUMNS, widths, strict=True))
    ]
    for row in _rows(samples, every, origin):
        lines.append(
            " ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        )
    return "\n".join(lines)


def markdown_table(
    samples: Sequence[Sample], *, every: int = 5, origin: float = 0.0
) -> str:
    head = [name for name, _ in COLUMNS]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" if n == "phase" else "---:" for n in head) + " |",
    ]
    for row in _rows(samples, every, origin):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


LEGEND = (
    "t: seconds from the start of the load (warm-up before it); phase: the "
    "fault phases the row saw; rss: mirror VmRSS (MiB); fds: its open fds; "
    "cpu%: mirror's CPU, % of one "
    "core; gen%, px%: the load generator's and the proxy's; conns: "
    "mirror_http_connections (incl. the scrape); dl/queue: downloads in "
    "progress/queued; up MB/s: bytes upstream sent the mirror; cli MB/s: body "
    "bytes the clients received; scrape: ms GET /metrics took (the longest in "
    "the interval); lag: the load generator's event-loop lag (ms, longest); "
    "probe: ms to GET a blob that was in the cache (longest; * not a hit, x "
    "failed); ok..bad: client outcomes in the interval "
    "(ok includes the hostile clients' expected endings; bad: mismatch, "
    "stall not cut, slow client not closed); sendto, evict: "
    "mirror_http_send_timeouts_total and mirror_evictions_total increase."
)


def summary(result: SoakResult) -> str:
    base, final, peaks = result.baseline, result.final, result.peaks
    outcomes = result.outcomes
    herd = result.upstream.get("herd", {})
    lines = [
        f"load: {result.settings['duration']:.0f} s, "
        f"{result.settings['clients']} clients "
        f"({', '.join(f'{k} {v}' for k, v in outcomes['clients'].items())})",
        f"requests finished: {outcomes['requests']} "
        f"({outcomes['requests'] / max(1.0, result.settings['duration']):.0f}/s); "
        f"by outcome: {_pairs(outcomes['by_outcome'])}",
        f"client body bytes: {outcomes['received_mib']:.0f} MiB; upstream sent "
        f"{result.upstream.get('bytes_to_mirror_mib', 0):.0f} MiB "
        f"over {result.upstream.get('connections', 0)} connections",
        f"memory: idle {_num(base.get('idle_rss_mib'), 1)} MiB, after warm-up "
        f"{_num(base.get('rss_mib'), 1)} MiB, peak {_num(peaks.get('rss_mib'), 1)}"
        f" MiB (VmHWM {_num(peaks.get('vmhwm_mib'), 1)}), settled "
        f"{_num(final.get('rss_mib'), 1)} MiB",
        f"fds: idle {_num(base.get('idle_fds'))}, after warm-up "
        f"{_num(base.get('fds'))}, peak {_num(peaks.get('fds'))}, settled "
        f"{_num(final.get('fds'))}; settled in {_num(final.get('settle_s'), 1)} s",
        f"peaks: {_num(peaks.get('connections'))} client connections, "
        f"{_num(peaks.get('downloads'))} downloads, {_num(peaks.get('queued'))} "
        "queued",
        f"mirror counters: {_pairs(result.mirror.get('counters', {}))}",
        f"herd: {herd.get('rounds', 0)} rounds of "
        f"{outcomes['clients'].get('herd', 0)} clients; rounds by the number of "
        f"whole upstream GETs of their blob: {herd.get('rounds_by_whole_gets')}",
        f"RSS drift during the load: {_num(peaks.get('rss_drift_mib_per_min'), 1)} "
        "MiB/min (least squares); mean CPU, % of a core: "
        + ", ".join(f"{k} {_num(v)}" for k, v in peaks.get("cpu_mean", {}).items()),
        "latency (s, ok requests) p50/p99/max: "
        + "; ".join(
            f"{kind} {v['p50']:.3f}/{v['p99']:.3f}/{v['max']:.3f}"
            for kind, v in outcomes.get("latency", {}).items()
        ),
        "slow clients closed after (s, max): "
        + "; ".join(
            f"{k} {v:.1f}" for k, v in outcomes.get("closed_max_s", {}).items()
        ),
    ]
    return "\n".join(lines)


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items())


def outcome_table(counts: dict[str, dict[str, int]], label: str = "kind") -> str:
    """kind (or phase) -> outcome -> count, as Markdown."""
    outcomes = sorted({o for per_kind in counts.values() for o in per_kind})
    lines = [
        f"| {label} | " + " | ".join(outcomes) + " |",
        "| --- | " + " | ".join("---:" for _ in outcomes) + " |",
    ]
    for kind, per_kind in counts.items():
        cells = [str(per_kind.get(outcome, 0)) for outcome in outcomes]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: SoakResult) -> str:
    start = result.marks.get("load", 0.0)
    load = [s for s in result.samples if s.t >= start]
    return "\n\n".join(
        [
            "## Time series (every 5 s, from the start of the load)",
            markdown_table(load, origin=start),
            LEGEND,
            "## Outcomes by kind",
            outcome_table(result.outcomes["by_kind"]),
            "## Outcomes by phase",
            outcome_table(result.outcomes["by_phase"], "phase"),
            "## Summary",
            "```\n" + summary(result) + "\n```",
            "## Checks",
            "\n".join(f"- {check.line()}" for check in result.checks),
        ]
    )


def write(out: Path, result: SoakResult) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "soak.json"
    md_path = out / "soak.md"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md_path.write_text(markdown(result) + "\n")
    return json_path, md_path
