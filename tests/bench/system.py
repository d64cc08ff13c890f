"""What the benchmark ran on, and how much memory the targets took.

This module owns the machine description written next to every result (CPU,
cores, memory, kernel, load, tool versions), so numbers are never compared
without knowing where they came from, and the peak resident set size of a
process tree, read from ``/proc/<pid>/status`` (``VmHWM``: the kernel's own
high-water mark, so no sampling can miss a short peak).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mirror import __version__ as mirror_version

PROC = Path("/proc")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status``, or None if the process is gone."""
    for line in _read(PROC / str(pid) / "status").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return None


def _children() -> dict[int, list[int]]:
    """Every process's children, from the parent pid in ``/proc/*/stat``."""
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 2:
            tree[int(fields[1])].append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are still running."""
    tree = _children()
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


@dataclass(frozen=True)
class PeakRss:
    """Peak RSS of a process tree: each process's ``VmHWM`` and their sum.

    The sum over-counts pages the processes share (nginx workers share the
    master's code and the cache zone), so it is an upper bound.
    """

    per_process_kib: dict[int, int] = field(default_factory=dict)

    @property
    def total_mib(self) -> float:
        return sum(self.per_process_kib.values()) / 1024

    @property
    def max_mib(self) -> float:
        return max(self.per_process_kib.values(), default=0) / 1024

    def to_json(self) -> dict[str, Any]:
        return {
            "sum_mib": round(self.total_mib, 1),
            "max_mib": round(self.max_mib, 1),
            "processes": len(self.per_process_kib),
            "per_process_kib": {str(k): v for k, v in self.per_process_kib.items()},
        }


def peak_rss(root: int) -> PeakRss:
    """Read the peak RSS of ``root`` and its descendants; call before stopping."""
    readings: dict[int, int] = {}
    for pid in process_tree(root):
        value = _proc_status_kib(pid, "VmHWM")
        if value is not None:
            readings[pid] = value
    return PeakRss(readings)


VERSION = re.compile(r"\d+\.\d+[\w.+~-]*")


def _first_line(argv: list[str]) -> str:
    """The first line a command prints on stdout or stderr."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _version(argv: list[str]) -> str:
    """The version a tool prints (nginx prints it to stderr), e.g. ``1.22.1``."""
    line = _first_line(argv)
    match = VERSION.search(line)
    return match[0] if match else line


def _cpu_model() -> str:
    for line in _read(PROC / "cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    kib = 0
    for line in _read(PROC / "meminfo").splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
    return round(kib / 1024 / 1024, 1)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_revision(repo: Path) -> str:
    """``HEAD``'s commit, with ``-dirty`` if the work tree has changes."""
    head = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"],
        capture_output=True,
        text=True,
        check=False,
    )
    return head + ("-dirty" if status.stdout.strip() else "")


def machine(tools: dict[str, str], repo: Path) -> dict[str, Any]:
    """Describe this machine and the versions of everything measured."""
    versions = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "mirror": f"{mirror_version} ({git_revision(repo)})",
        "nginx": _version([tools["nginx"], "-v"]),
        "docker-registry": _version([tools["docker-registry"], "--version"]),
        "skopeo": _version([tools["skopeo"], "--version"]),
        "wrk": _version([tools["wrk"], "-v"]),
    }
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _read(Path("/etc/debian_version")).strip() or platform.platform(),
        "load_average_at_start": load_average(),
        "versions": versions,
    }
