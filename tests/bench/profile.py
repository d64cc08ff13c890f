"""py-spy on the mirror process while a load runs, summarised as hot spots.

This module owns ``Profiler``: ``py-spy record --format raw`` attached to a
running mirror for as long as a load generator runs, and ``summarise``,
which turns py-spy's collapsed stacks into the functions that were on CPU
(self time) and the functions that CPU time was spent under (inclusive
time). Idle samples (the event loop waiting in ``epoll``) are not recorded
by py-spy, so the sample count also tells how busy the process was.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# "function (path/to/file.py:123)"; the line number is dropped so a
# function's samples add up across its lines.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
SITE_PACKAGES = re.compile(r"^.*?/(?:site|dist)-packages/")
STDLIB = re.compile(r"^.*?/lib/python3\.\d+/")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _short_file(path: str) -> str:
    """``aiohttp/web_protocol.py``, ``asyncio/events.py``, ``mirror/proxy.py``."""
    if path.startswith(f"{REPO_ROOT}/"):
        return path.removeprefix(f"{REPO_ROOT}/")
    return STDLIB.sub("", SITE_PACKAGES.sub("", path))


def _frame_name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({_short_file(match['file'])})"


# Leaves where a thread waits rather than works: the event loop in epoll,
# idle to_thread workers and aiosqlite's thread (both blocked in a C-level
# queue get, which py-spy's idle detection does not always recognise).
IDLE_LEAVES = frozenset(
    {
        "EpollSelector.select (selectors.py)",
        "_worker (concurrent/futures/thread.py)",
        "_connection_worker_thread (aiosqlite/core.py)",
    }
)
# Frames on every stack of the serving thread: they say nothing.
ENTRY_FRAMES = frozenset(
    {
        "<module> (mirror/__main__.py)",
        "main (mirror/cli.py)",
        "serve (mirror/cli.py)",
        "run_app (aiohttp/web.py)",
    }
)
INCLUSIVE_PACKAGES = ("(mirror/", "(aiohttp/", "(prometheus_client/")


def _counts_inclusive(name: str) -> bool:
    return name not in ENTRY_FRAMES and any(p in name for p in INCLUSIVE_PACKAGES)


@dataclass(frozen=True)
class Profile:
    samples: int
    seconds: float
    rate: int
    self_time: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]

    @property
    def busy_share(self) -> float:
        """Working samples over the samples one busy thread would give."""
        return self.samples / max(1.0, self.seconds * self.rate)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "seconds": self.seconds,
            "rate": self.rate,
            "busy_share": round(self.busy_share, 3),
            "self": [
                {"function": f, "share": round(n / self.samples, 3)}
                for f, n in self.self_time
            ],
            "inclusive": [
                {"function": f, "share": round(n / self.samples, 3)}
                for f, n in self.inclusive
            ],
        }

    def describe(self, top: int = 10) -> str:
        lines = [
            f"{self.samples} samples in {self.seconds:g}s at {self.rate}/s "
            f"(on CPU {self.busy_share:.0%} of the time)",
            "  self time:",
        ]
        total = max(self.samples, 1)
        lines += [f"    {n / total:6.1%}  {f}" for f, n in self.self_time[:top]]
        lines.append("  inclusive (mirror, aiohttp and prometheus_client frames):")
        lines += [f"    {n / total:6.1%}  {f}" for f, n in self.inclusive[:top]]
        return "\n".join(lines)


def summarise(raw: str, *, seconds: float, rate: int, top: int = 25) -> Profile:
    """Self and inclusive sample counts per function from collapsed stacks.

    Idle samples are dropped, so shares are of the time spent working.
    """
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";")]
        # py-spy puts "process ..." and "thread ..." pseudo-frames first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames or frames[-1] in IDLE_LEAVES:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            if _counts_inclusive(name):
                under[name] += count
    return Profile(
        samples=samples,
        seconds=seconds,
        rate=rate,
        self_time=own.most_common(top),
        inclusive=under.most_common(top),
    )


@dataclass
class Profiler:
    """One ``py-spy record`` of a process, run alongside a load."""

    binary: str
    pid: int
    output: Path
    rate: int = 200

    async def record(self, seconds: float) -> Profile:
        """Sample for ``seconds``; returns the summary (raw stacks at ``output``)."""
        process = await asyncio.create_subprocess_exec(
            self.binary,
            "record",
            "--pid",
            str(self.pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--output",
            str(self.output),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), seconds + 30)
        if process.returncode != 0 or not self.output.exists():
            raise RuntimeError(
                f"py-spy failed ({process.returncode}): {out.decode(errors='replace')}"
            )
        raw = self.output.read_text()
        return summarise(raw, seconds=seconds, rate=self.rate)
