"""wrk as the load generator, with its summary read as JSON.

This module owns ``run_wrk``: one ``wrk`` run against one URL with a fixed
number of threads and connections, and a small Lua ``done`` hook that prints
wrk's summary as one JSON line, so no human-oriented output ("1.23MB") is
parsed. wrk is C and cheap per request, so on a two-core machine it takes
less of the CPU away from the server than a Python client would. Given
``paths``, each thread's requests go round those paths instead (a Lua
``request`` hook), for a load spread over many keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.tools import run

MARKER = "WRK_JSON "

REPORT_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "bytes": %.0f, "duration_us": %.0f, ' ..
    '"errors": {"connect": %.0f, "read": %.0f, "write": %.0f, ' ..
    '"status": %.0f, "timeout": %.0f}, ' ..
    '"latency_us": {"p50": %.0f, "p99": %.0f, "max": %.0f}}\\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# A Lua state per wrk thread: each thread walks the list on its own.
ROTATE_LUA = """\
local paths = {%s}
local turn = 0
request = function()
  turn = turn + 1
  return wrk.format(nil, paths[turn %% #paths + 1])
end
"""


def lua_string(value: str) -> str:
    """``value`` as a Lua string literal (paths: no quote or backslash)."""
    if any(char in value for char in '"\\\n'):
        raise ValueError(f"not a plain path: {value!r}")
    return f'"{value}"'


def rotating_script(workdir: Path, paths: Sequence[str]) -> Path:
    """The Lua script: the JSON report, plus the rotation over ``paths``."""
    text = REPORT_LUA + ROTATE_LUA % ", ".join(lua_string(path) for path in paths)
    name = hashlib.sha256(text.encode()).hexdigest()[:12]
    script = workdir / f"wrk-{name}.lua"
    if not script.exists():
        script.write_text(text)
    return script


class WrkError(Exception):
    """wrk failed or printed no summary."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    errors: dict[str, int]
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_second(self) -> float:
        """Megabytes (10^6 bytes) of response per second, headers included."""
        return self.bytes / self.seconds / 1e6

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests_per_second, 1),
            "mb_per_second": round(self.mb_per_second, 1),
            "errors": self.errors,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
        }


def parse_summary(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line.removeprefix(MARKER))
            latency = data["latency_us"]
            return WrkResult(
                requests=int(data["requests"]),
                bytes=int(data["bytes"]),
                seconds=data["duration_us"] / 1e6,
                errors={key: int(value) for key, value in data["errors"].items()},
                latency_p50_ms=round(latency["p50"] / 1000, 3),
                latency_p99_ms=round(latency["p99"] / 1000, 3),
            )
    raise WrkError(f"no {MARKER.strip()} line in wrk's output:\n{output}")


async def run_wrk(
    binary: str,
    url: str,
    *,
    workdir: Path,
    seconds: float,
    connections: int,
    threads: int = 2,
    headers: dict[str, str] | None = None,
    paths: Sequence[str] | None = None,
) -> WrkResult:
    """Load ``url`` for ``seconds`` with ``connections`` keep-alive connections.

    With ``paths``, the requests go round them on ``url``'s host instead of
    all asking for ``url``'s own path.
    """
    script = workdir / "wrk-report.lua"
    if paths:
        script = rotating_script(workdir, paths)
    elif not script.exists():
        script.write_text(REPORT_LUA)
    header_args = [
        arg
        for name, value in (headers or {}).items()
        for arg in ("-H", f"{name}: {value}")
    ]
    result = await run(
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "60s",
        "-s",
        script,
        *header_args,
        url,
        time_limit=seconds + 60,
        check=False,
    )
    if result.returncode != 0:
        raise WrkError(result.describe())
    return parse_summary(result.stdout)
