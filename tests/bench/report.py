"""Results of one benchmark run: the table, the target checks, the files.

This module owns what a run produces from its measurements: ``Results``
(every number per target, JSON-ready), the client-auth comparison
(``ClientAuthResults``: mirror with auth off and on), the target checks from
issues 5, 10 and 12 each evaluated to PASS or FAIL, the plain-text tables
printed at the end, and the files written to the output directory (``results.json``
and a Markdown ``results.md`` ready to paste into docs/benchmarks.md).
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

# Issue 12: a cold pull within 1.5x direct on loopback, 1.1x over the WAN.
COLD_LIMIT = 1.5
WAN_COLD_LIMIT = 1.1
MANIFEST_FACTOR = 5.0
# Issue 12: cached manifests, absolute, by digest and by tag.
MANIFEST_RPS = 25_000
# Issue 12: peak RSS of one mirror process <= 60 MB, in bytes (10^6, as
# the issue writes it): 57.2 MiB.
RSS_LIMIT_BYTES = 60e6
RSS_LIMIT_MIB = RSS_LIMIT_BYTES / (1 << 20)
# The cluster scenario's target: three mirror nodes behind HAProxy.
CLUSTER_NAME = "mirror \N{MULTIPLICATION SIGN}3 via haproxy"
# Issue 10: a warm cached pull with auth on stays within 10% of auth off.
AUTH_TOLERANCE = 0.10


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
    wan_cold_pull: list[float] = field(default_factory=list)
    """Cold pulls with the upstream behind the WAN proxy (the target's own
    instance pointed at it; direct: the client through it)."""
    wan_herd: Herd | None = None
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

    @property
    def wan_cold(self) -> float | None:
        return statistics.median(self.wan_cold_pull) if self.wan_cold_pull else None

    def to_json(self) -> dict[str, Any]:
        def load(value: Load | None) -> dict[str, Any] | None:
            return None if value is None else value.to_json()

        def herd(value: Herd | None) -> dict[str, Any] | None:
            return None if value is None else value.to_json()

        return {
            "cold_pull_seconds": [round(s, 3) for s in self.cold_pull],
            "cold_pull_median": _round(self.cold),
            "warm_pull_seconds": [round(s, 3) for s in self.warm_pull],
            "warm_pull_median": _round(self.warm),
            "herd": herd(self.herd),
            "wan_cold_pull_seconds": [round(s, 3) for s in self.wan_cold_pull],
            "wan_cold_pull_median": _round(self.wan_cold),
            "wan_herd": herd(self.wan_herd),
            "blob_throughput": load(self.blob),
            "manifest_by_digest": load(self.manifest_digest),
            "manifest_by_tag": load(self.manifest_tag),
            "peak_rss": None if self.rss is None else self.rss.to_json(),
            "peak_rss_mib_after": {k: round(v, 1) for k, v in self.rss_after.items()},
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class AuthSide:
    """The client-auth scenario's numbers for one mirror (auth off or on).

    Auth on only: ``first_login_pull``, warm pulls each with a login the
    mirror had not verified yet (one bcrypt check each), and ``logins``, per
    measured wrk run and for the warm pulls, how the mirror's
    ``mirror_client_auth_total`` moved, by result (``verified`` is a bcrypt
    check, ``cached`` a recently verified login, ``missing`` a request
    without credentials, such as each pull's first ping).
    """

    manifest_digest: Load = field(default_factory=Load)
    manifest_tag: Load = field(default_factory=Load)
    warm_pull: list[float] = field(default_factory=list)
    first_login_pull: list[float] = field(default_factory=list)
    logins: list[dict[str, Any]] = field(default_factory=list)

    def manifest(self, kind: str) -> Load:
        """The load by ``digest`` or by ``tag``."""
        return {"digest": self.manifest_digest, "tag": self.manifest_tag}[kind]

    @property
    def warm(self) -> float | None:
        return statistics.median(self.warm_pull) if self.warm_pull else None

    @property
    def first_login(self) -> float | None:
        pulls = self.first_login_pull
        return statistics.median(pulls) if pulls else None

    def to_json(self) -> dict[str, Any]:
        def load(value: Load) -> dict[str, Any] | None:
            return value.to_json() if value.rounds else None

        return {
            "manifest_by_digest": load(self.manifest_digest),
            "manifest_by_tag": load(self.manifest_tag),
            "warm_pull_seconds": [round(s, 3) for s in self.warm_pull],
            "warm_pull_median": _round(self.warm),
            "first_login_pull_seconds": [round(s, 3) for s in self.first_login_pull],
            "first_login_pull_median": _round(self.first_login),
            "logins": self.logins,
        }


@dataclass
class ClientAuthResults:
    """mirror with ``auth.htpasswd`` (``on``) against mirror without (``off``).

    ``bcrypt_seconds``: one ``bcrypt.checkpw`` at ``bcrypt_cost``, timed in
    the benchmark's own process: what the first request of a credential (and
    the first after its verified login expires) waits for.
    """

    bcrypt_cost: int
    bcrypt_seconds: float
    off: AuthSide = field(default_factory=AuthSide)
    on: AuthSide = field(default_factory=AuthSide)

    def to_json(self) -> dict[str, Any]:
        return {
            "bcrypt_cost": self.bcrypt_cost,
            "bcrypt_checkpw_seconds": round(self.bcrypt_seconds, 4),
            "auth_off": self.off.to_json(),
            "auth_on": self.on.to_json(),
            "ratios_on_to_off": {
                name: None if value is None else round(value, 3)
                for name, value in auth_ratios(self).items()
            },
        }


def auth_ratios(auth: ClientAuthResults) -> dict[str, float | None]:
    """on / off for each measurement (req/s: < 1 is a cost; seconds: > 1)."""

    def rate(pick: SidePick) -> float | None:
        off, on = pick(auth.off), pick(auth.on)
        if not off.rounds or not on.rounds:
            return None
        return on.wrk.requests_per_second / off.wrk.requests_per_second

    off_warm, on_warm = auth.off.warm, auth.on.warm
    return {
        "manifest_by_digest_rps": rate(lambda side: side.manifest_digest),
        "manifest_by_tag_rps": rate(lambda side: side.manifest_tag),
        "warm_pull_seconds": None
        if off_warm is None or on_warm is None
        else on_warm / off_warm,
    }


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
SidePick = Callable[[AuthSide], Load]


def _cold(mirror: float | None, direct: float | None, limit: float) -> Verdict | None:
    if mirror is None or direct is None:
        return None
    ratio = mirror / direct
    return ratio <= limit, (
        f"mirror {mirror:.2f} s vs direct {direct:.2f} s "
        f"= {ratio:.2f}x (limit {limit}x)"
    )


def _throughput(mirror: TargetResults, nginx: TargetResults) -> Verdict | None:
    if mirror.blob is None or nginx.blob is None:
        return None
    ours, theirs = mirror.blob.wrk.mb_per_second, nginx.blob.wrk.mb_per_second
    return ours >= theirs, (
        f"mirror {ours:.0f} MB/s vs nginx {theirs:.0f} MB/s = {ours / theirs:.2f}x"
    )


def _herd_gets(herd: Herd | None, who: str = "mirror") -> Verdict | None:
    """Every blob of the herd image fetched from upstream exactly once."""
    if herd is None:
        return None
    once = len(herd.upstream_blob_gets) == herd.blobs and set(
        herd.upstream_blob_gets.values()
    ) == {1}
    return once, (
        f"{who}: {herd.total_blob_gets} upstream blob GETs for {herd.blobs} blobs "
        f"({len(herd.client_seconds)} clients)"
    )


def _herd_time(mirror: Herd | None, direct: Herd | None) -> Verdict | None:
    if mirror is None or direct is None:
        return None
    ours, theirs = mirror.seconds, direct.seconds
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


def _manifest_rate(mirror: TargetResults, pick: Pick) -> Verdict | None:
    load = pick(mirror)
    if load is None:
        return None
    ours = load.wrk.requests_per_second
    return ours >= MANIFEST_RPS, (
        f"mirror {ours:.0f} req/s (target {MANIFEST_RPS:,} req/s)"
    )


def _memory(mirror: TargetResults, dist: TargetResults) -> Verdict | None:
    if mirror.rss is None or dist.rss is None:
        return None
    ours, theirs = mirror.rss.total_mib, dist.rss.total_mib
    return ours <= theirs, f"mirror {ours:.0f} MiB vs distribution {theirs:.0f} MiB"


def _memory_limit(mirror: TargetResults) -> Verdict | None:
    """The largest mirror process's peak (mirror runs as one process)."""
    if mirror.rss is None or not mirror.rss.per_process_kib:
        return None
    ours = mirror.rss.max_mib
    return ours <= RSS_LIMIT_MIB, (
        f"mirror {ours:.1f} MiB ({ours * (1 << 20) / 1e6:.1f} MB) "
        f"vs limit {RSS_LIMIT_MIB:.1f} MiB ({RSS_LIMIT_BYTES / 1e6:g} MB)"
    )


def _auth_tag_rate(auth: ClientAuthResults | None) -> Verdict | None:
    if auth is None:
        return None
    ratio = auth_ratios(auth)["manifest_by_tag_rps"]
    if ratio is None:
        return None
    off = auth.off.manifest_tag.wrk.requests_per_second
    on = auth.on.manifest_tag.wrk.requests_per_second
    limit = 1 - AUTH_TOLERANCE
    return ratio >= limit, (
        f"auth on {on:.0f} req/s vs off {off:.0f} req/s = {ratio:.2f}x "
        f"(limit {limit:.2f}x)"
    )


def _auth_warm_pull(auth: ClientAuthResults | None) -> Verdict | None:
    if auth is None or auth.off.warm is None or auth.on.warm is None:
        return None
    off, on = auth.off.warm, auth.on.warm
    limit = 1 + AUTH_TOLERANCE
    ratio = on / off
    return ratio <= limit, (
        f"auth on {on:.3f} s vs off {off:.3f} s = {ratio:.2f}x (limit {limit:.2f}x)"
    )


def evaluate(
    results: dict[str, TargetResults], client_auth: ClientAuthResults | None = None
) -> list[Check]:
    """The issues' targets for mirror, each against its reference."""
    empty = TargetResults("missing")
    mirror = results.get("mirror", empty)
    direct = results.get("direct", empty)
    dist = results.get("distribution", empty)
    nginx = results.get("nginx", empty)
    cluster = results.get(CLUSTER_NAME, empty)
    verdicts: list[tuple[str, Verdict | None]] = [
        (
            f"cold pull <= {COLD_LIMIT}x direct",
            _cold(mirror.cold, direct.cold, COLD_LIMIT),
        ),
        (
            f"WAN cold pull <= {WAN_COLD_LIMIT}x direct",
            _cold(mirror.wan_cold, direct.wan_cold, WAN_COLD_LIMIT),
        ),
        ("cached blob throughput >= nginx", _throughput(mirror, nginx)),
        ("herd: one upstream GET per blob", _herd_gets(mirror.herd)),
        ("WAN herd: one upstream GET per blob", _herd_gets(mirror.wan_herd)),
        (
            "cluster herd: one upstream GET per blob",
            _herd_gets(cluster.herd, CLUSTER_NAME),
        ),
        ("herd: total time <= direct", _herd_time(mirror.herd, direct.herd)),
        (
            "WAN herd: total time <= direct",
            _herd_time(mirror.wan_herd, direct.wan_herd),
        ),
        (
            f"manifests by digest: req/s >= {MANIFEST_RPS:,}",
            _manifest_rate(mirror, lambda r: r.manifest_digest),
        ),
        (
            f"manifests by tag: req/s >= {MANIFEST_RPS:,}",
            _manifest_rate(mirror, lambda r: r.manifest_tag),
        ),
        (
            f"manifests by digest: req/s >= {MANIFEST_FACTOR:g}x distribution",
            _manifests(mirror, dist, lambda r: r.manifest_digest),
        ),
        (
            f"manifests by tag: req/s >= {MANIFEST_FACTOR:g}x distribution",
            _manifests(mirror, dist, lambda r: r.manifest_tag),
        ),
        (
            f"peak RSS of one mirror process <= {RSS_LIMIT_BYTES / 1e6:g} MB",
            _memory_limit(mirror),
        ),
        ("peak RSS <= distribution", _memory(mirror, dist)),
        (
            f"auth on within {AUTH_TOLERANCE:.0%} of auth off: manifest by tag req/s",
            _auth_tag_rate(client_auth),
        ),
        (
            f"auth on within {AUTH_TOLERANCE:.0%} of auth off: warm pull",
            _auth_warm_pull(client_auth),
        ),
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
    pattern: str, metric: Callable[[Herd], float], *, wan: bool = False
) -> Callable[[TargetResults], str]:
    def cell(result: TargetResults) -> str:
        herd = result.wan_herd if wan else result.herd
        return "-" if herd is None else pattern.format(metric(herd))

    return cell


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
    ("WAN cold pull, s (median)", lambda r: _fmt(r.wan_cold, "{:.2f}")),
    ("WAN herd: total time, s", _herd_cell("{:.2f}", lambda h: h.seconds, wan=True)),
    (
        "WAN herd: upstream blob GETs",
        _herd_cell("{:.0f}", lambda h: h.total_blob_gets, wan=True),
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
    (
        "peak RSS, MiB (largest process)",
        lambda r: _fmt(None if r.rss is None else r.rss.max_mib, "{:.0f}"),
    ),
]


def table_cells(results: dict[str, TargetResults]) -> list[list[str]]:
    names = list(results)
    cells = [["", *names]]
    for label, cell in ROWS:
        cells.append([label, *(cell(results[name]) for name in names)])
    return cells


def text_table(results: dict[str, TargetResults]) -> str:
    return _text(table_cells(results))


def _text(cells: list[list[str]]) -> str:
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
    return _markdown(table_cells(results))


def _markdown(cells: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(cells[0]) + " |",
        "| --- |" + " ---: |" * (len(cells[0]) - 1),
    ]
    lines += [
        "| " + " | ".join(cell.strip() for cell in row) + " |" for row in cells[1:]
    ]
    return "\n".join(lines)


def auth_cells(auth: ClientAuthResults) -> list[list[str]]:
    """The client-auth comparison: one row per measurement, off, on, on/off."""
    ratios = auth_ratios(auth)

    def ratio(name: str) -> str:
        value = ratios[name]
        return "-" if value is None else f"{value:.2f}x"

    def cells(pick: SidePick, pattern: str, metric: str) -> list[str]:
        return [_side_load(pick(side), pattern, metric) for side in (auth.off, auth.on)]

    return [
        ["", "auth off", "auth on", "on/off"],
        [
            "manifest by digest, req/s",
            *cells(lambda side: side.manifest_digest, "{:.0f}", "requests_per_second"),
            ratio("manifest_by_digest_rps"),
        ],
        [
            "manifest by tag, req/s",
            *cells(lambda side: side.manifest_tag, "{:.0f}", "requests_per_second"),
            ratio("manifest_by_tag_rps"),
        ],
        [
            "manifest by tag, p99 ms",
            *cells(lambda side: side.manifest_tag, "{:.1f}", "latency_p99_ms"),
            "",
        ],
        [
            "warm pull, s (median)",
            _fmt(auth.off.warm, "{:.3f}"),
            _fmt(auth.on.warm, "{:.3f}"),
            ratio("warm_pull_seconds"),
        ],
        [
            "warm pull, new login, s (median)",
            "-",
            _fmt(auth.on.first_login, "{:.3f}"),
            "",
        ],
    ]


def _side_load(load: Load, pattern: str, metric: str) -> str:
    if not load.rounds:
        return "-"
    text = pattern.format(getattr(load.wrk, metric))
    if load.error_count:
        text += f" ({load.error_count} errors)"
    return text


def auth_text_table(auth: ClientAuthResults) -> str:
    return _text(auth_cells(auth))


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
    client_auth: ClientAuthResults | None = None,
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` to ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine,
        "settings": settings,
        "targets": {name: result.to_json() for name, result in results.items()},
        "client_auth": None if client_auth is None else client_auth.to_json(),
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
        *(
            []
            if client_auth is None
            else [
                f"Client auth (bcrypt cost {client_auth.bcrypt_cost}, one check "
                f"{client_auth.bcrypt_seconds * 1000:.0f} ms):",
                "",
                _markdown(auth_cells(client_auth)),
                "",
            ]
        ),
        *(f"- **{c.verdict}** {c.name}: {c.detail}" for c in checks),
        "",
    ]
    md_path = out / "results.md"
    md_path.write_text("\n".join(markdown))
    return json_path, md_path
