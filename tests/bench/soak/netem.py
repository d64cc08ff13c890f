"""A LatencyProxy (tests/fakes/network.py) in a process of its own.

The soak's load generator keeps its own event loop and the GIL busy with
hundreds of clients; a proxy thread in that process would shape the
upstream by how busy the clients are, not by its settings. So the proxy
runs in a child, ``python -m tests.bench.soak.netem --target-port N ...``,
and takes its orders as JSON lines on stdin, answering each with one JSON
line on stdout:

* ``{"op": "cut", "after": BYTES, "times": N|null}``, ``{"op": "stall",
  ...}``, ``{"op": "release"}``, ``{"op": "refuse"}``, ``{"op": "accept"}``,
  ``{"op": "reset"}``: the LatencyProxy fault methods of those names;
* ``{"op": "counters"}``: its ``Counters`` as an object;
* ``{"op": "stop"}`` (or end of input): stop it, reporting any relaying
  error the proxy caught (a bug in the proxy, not a network fault).

The first line the child prints is ``{"port": N}`` once it listens.
``ProxyProcess`` is the parent's side: it starts the child, sends the
orders and reads the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.fakes.network import LatencyProxy, Link, wan

FAULTS = ("release", "refuse", "accept", "reset")


@dataclasses.dataclass(frozen=True)
class Shape:
    """How both directions behave (see ``tests.fakes.network.wan``)."""

    latency: float = 0.02
    jitter: float = 0.02
    response_rate: float | None = 8e6
    request_max_segment: int = 1460
    response_max_segment: int = 16 * 1024

    def argv(self) -> list[str]:
        rate = "none" if self.response_rate is None else str(self.response_rate)
        return [
            f"--latency={self.latency}",
            f"--jitter={self.jitter}",
            f"--response-rate={rate}",
            f"--request-max-segment={self.request_max_segment}",
            f"--response-max-segment={self.response_max_segment}",
        ]

    def links(self) -> tuple[Link, Link]:
        request = wan(self.latency, self.jitter, max_segment=self.request_max_segment)
        response = wan(
            self.latency,
            self.jitter,
            rate=self.response_rate,
            max_segment=self.response_max_segment,
        )
        return request, response


def _answer(proxy: LatencyProxy, order: dict[str, Any]) -> dict[str, Any]:
    op = order.get("op")
    if op == "cut":
        proxy.cut(int(order.get("after", 0)), times=order.get("times"))
    elif op == "stall":
        proxy.stall(int(order.get("after", 0)), times=order.get("times"))
    elif op in FAULTS:
        getattr(proxy, str(op))()
    elif op == "counters":
        return {"ok": True, "counters": dataclasses.asdict(proxy.counters)}
    else:
        return {"ok": False, "error": f"unknown op {op!r}"}
    return {"ok": True}


def child(argv: Sequence[str] | None = None) -> int:
    """The child's main: relay until ``stop`` or the end of stdin."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak.netem")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--seed", default="soak")
    parser.add_argument("--latency", type=float, default=Shape.latency)
    parser.add_argument("--jitter", type=float, default=Shape.jitter)
    parser.add_argument("--response-rate", default=str(Shape.response_rate))
    parser.add_argument(
        "--request-max-segment", type=int, default=Shape.request_max_segment
    )
    parser.add_argument(
        "--response-max-segment", type=int, default=Shape.response_max_segment
    )
    args = parser.parse_args(argv)
    rate = None if args.response_rate == "none" else float(args.response_rate)
    shape = Shape(
        args.latency,
        args.jitter,
        rate,
        args.request_max_segment,
        args.response_max_segment,
    )
    request, response = shape.links()
    proxy = LatencyProxy(
        args.target_port, request=request, response=response, seed=args.seed
    )
    proxy.start()
    print(json.dumps({"port": proxy.port}), flush=True)
    status = 0
    for line in sys.stdin:
        order = json.loads(line)
        if order.get("op") == "stop":
            break
        try:
            answer = _answer(proxy, order)
        except Exception as error:  # noqa: BLE001 - reported to the parent
            answer = {"ok": False, "error": repr(error)}
        print(json.dumps(answer), flush=True)
    try:
        proxy.stop()
        answer = {"ok": True, "errors": []}
    except RuntimeError as error:
        answer = {"ok": False, "errors": [str(error)]}
        status = 1
    print(json.dumps(answer), flush=True)
    return status


class ProxyError(RuntimeError):
    """The proxy child refused an order, died, or reported relaying errors."""


class ProxyProcess:
    """The parent's handle on one netem child. ``start()``, orders, ``stop()``.

    Orders are serialised by a lock (one line out, one line back). The
    child's stderr goes to ``log_path``.
    """

    def __init__(
        self, target_port: int, shape: Shape, log_path: Path, *, seed: str = "soak"
    ) -> None:
        self.target_port = target_port
        self.shape = shape
        self.log_path = log_path
        self.seed = seed
        self.port = 0
        self.pid = 0
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.errors: list[str] = []
        """Relaying errors the proxy reported when it stopped."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the child and wait for its port. Raises ProxyError."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.bench.soak.netem",
                f"--target-port={self.target_port}",
                f"--seed={self.seed}",
                *self.shape.argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self._process.pid
        first = await self._line(within=20.0)
        self.port = int(first["port"])

    async def _line(self, *, within: float = 15.0) -> dict[str, Any]:
        process = self._process
        if process is None or process.stdout is None:
            raise ProxyError("proxy not started")
        try:
            async with asyncio.timeout(within):
                line = await process.stdout.readline()
        except TimeoutError:
            raise ProxyError(f"proxy did not answer in {within}s") from None
        if not line:
            raise ProxyError(f"proxy exited; see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def order(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one order; return the answer. Raises ProxyError if refused."""
        process = self._process
        if process is None or process.stdin is None:
            raise ProxyError("proxy not started")
        async with self._lock:
            process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            await process.stdin.drain()
            answer = await self._line()
        if not answer.get("ok"):
            raise ProxyError(f"proxy refused {op}: {answer.get('error')}")
        return answer

    async def counters(self) -> dict[str, int]:
        answer = await self.order("counters")
        counters: dict[str, int] = answer["counters"]
        return counters

    async def stop(self) -> None:
        """Stop the child; relaying errors it reports land in ``errors``."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(ConnectionError):
                process.stdin.write(b'{"op": "stop"}\n')
                await process.stdin.drain()
                process.stdin.close()
            self._process = process
            try:
                answer = await self._line(within=20.0)
                self.errors.extend(answer.get("errors", []))
            except ProxyError as error:
                self.errors.append(str(error))
            finally:
                self._process = None
        try:
            async with asyncio.timeout(10.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    raise SystemExit(child())
