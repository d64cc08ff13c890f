"""Short-lived private directories for daemons, and their careful removal.

This module owns the directories dockerd and containerd run in. Unix socket
paths must stay under ~108 bytes, and pytest's ``tmp_path`` is long, so
daemons get ``/tmp/mi-XXXXXXXX`` directories instead. dockerd bind-mounts its
data root onto itself, so removal first unmounts anything still mounted
below the directory (deepest first) and never follows a mount elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

PREFIX = "mi-"
# Deliberately /tmp rather than $TMPDIR: socket paths must stay short.
DAEMON_ROOT = Path("/tmp")  # noqa: S108


def make_daemon_dir() -> Path:
    """Create a fresh ``/tmp/mi-XXXXXXXX`` directory owned by this run."""
    return Path(tempfile.mkdtemp(prefix=PREFIX, dir=DAEMON_ROOT))


def mounts_below(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first."""
    root = directory.resolve()
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            path = Path(point)
            if path == root or root in path.parents:
                found.append(path)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_daemon_dir(directory: Path) -> None:
    """Unmount what a daemon left mounted in ``directory``, then delete it.

    Only accepts directories made by ``make_daemon_dir``; refuses anything
    else so a bug can never turn this into ``rm -rf`` of a real path.
    """
    resolved = directory.resolve()
    if resolved.parent != DAEMON_ROOT or not resolved.name.startswith(PREFIX):
        raise ValueError(f"refusing to remove {resolved}: not a daemon dir")
    for mount_point in mounts_below(resolved):
        subprocess.run(
            ["umount", "--lazy", str(mount_point)],
            check=False,
            capture_output=True,
            timeout=30,
        )
    if mounts_below(resolved):
        # Deleting through a live mount could reach outside our directory.
        raise RuntimeError(f"{resolved} still has mounts; not removing it")
    shutil.rmtree(resolved, ignore_errors=True)
