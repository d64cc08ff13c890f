"""The WAN scenario's link as a process of its own.

``LatencyProxy`` (tests/fakes/network.py) relays in a thread of the process
that starts it. In the benchmark that process is also the pulling client,
hashing every byte on its event loop, and the two threads share one GIL:
the proxy's sleeps end late and its relaying waits for the client, so the
link, not the target behind it, would set the pace. Run here, the proxy has
an interpreter to itself.

``WanProxy`` starts ``python -m tests.bench.wanproxy UPSTREAM_PORT``, which
starts the ``wan_proxy`` link, prints its port, relays until its stdin
closes, and then prints its counters as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.network import LatencyProxy, Link

REPO_ROOT = Path(__file__).resolve().parents[2]
# One way, and the response bandwidth per connection: 25 ms and 300 Mbit/s.
WAN_LATENCY = 0.025
WAN_RATE = 37.5e6
# Bytes each direction of a connection reads ahead into its delay line:
# enough for WAN_RATE over WAN_LATENCY several times over, so the window
# never caps the rate below WAN_RATE.
WAN_WINDOW = 4 << 20
START_TIMEOUT = 10.0


def wan_proxy(upstream_port: int) -> LatencyProxy:
    """The WAN link in front of the upstream on ``upstream_port``; not started."""
    return LatencyProxy(
        upstream_port,
        request=Link(latency=WAN_LATENCY),
        response=Link(latency=WAN_LATENCY, rate=WAN_RATE),
        seed="bench-wan",
        window=WAN_WINDOW,
    )


@dataclass
class WanProxy:
    """``wan_proxy`` in a child process: ``start()``, use ``url``, ``stop()``."""

    upstream_port: int
    port: int = 0
    counters: dict[str, Any] = field(default_factory=dict)
    """What went through, once stopped (LatencyProxy's Counters)."""
    _process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.wanproxy", str(self.upstream_port)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None  # set by PIPE
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"WAN proxy did not start: {line!r}")
        self.port = int(line)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            out, _ = process.communicate(input="", timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        if out.strip():
            self.counters = json.loads(out.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    proxy = wan_proxy(int(argv[0])).start()
    print(proxy.port, flush=True)
    try:
        sys.stdin.read()  # until the parent closes it (or dies)
    finally:
        counters = proxy.counters
        proxy.stop()
    print(json.dumps(dataclasses.asdict(counters)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
