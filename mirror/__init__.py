"""mirror: a pull-through caching mirror for Docker Hub and other registries."""

import os
from pathlib import Path

__version__ = "0.1.0"


def _revision() -> str:
    """The source revision: MIRROR_REVISION (set by the image build), else the
    commit checked out where mirror runs from, else "unknown". Read once, at
    import, without running git."""
    given = os.environ.get("MIRROR_REVISION", "").strip()
    if given:
        return given[:40]
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            loose = git / ref
            if loose.is_file():
                head = loose.read_text().strip()
            else:
                packed = (git / "packed-refs").read_text().splitlines()
                head = next(
                    (line.split()[0] for line in packed if line.endswith(" " + ref)),
                    "",
                )
    except OSError:
        return "unknown"
    if len(head) < 12 or any(c not in "0123456789abcdef" for c in head):
        return "unknown"
    return head[:12]


__revision__ = _revision()
