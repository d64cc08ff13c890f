"""The upstream fault schedule: which fault the proxy injects when.

This module owns ``SCHEDULE``, the phases of a load as shares of its
duration, and ``inject``, which walks through them, telling the proxy
(``netem.ProxyProcess``) what to do and the clients (``World.phase``) which
phase they are in, so every outcome is counted under the fault that caused
it. Phases:

* ``clean``: the shaped network only (latency, small segments, a rate cap);
* ``cut``: every upstream connection is closed after a random number of
  response bytes (re-drawn each second, 32 KiB to 3 MiB): downloads resume
  with Range requests, and the large ones run out of resumes and fail;
* ``stall``: every upstream response stops after a random number of bytes
  and stays open for longer than ``upstream.read_timeout``;
* ``down``: the port refuses connections and every open one is reset;
* ``flaky``: one connection is cut every half second (resumes succeed).

The last quarter is clean, so the run ends with the mirror recovering, not
in the middle of a fault.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .netem import ProxyProcess

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    """Share of the duration at which it begins."""


SCHEDULE = (
    Phase("clean", 0.00),
    Phase("cut", 0.12),
    Phase("clean", 0.24),
    Phase("stall", 0.30),
    Phase("clean", 0.44),
    Phase("down", 0.50),
    Phase("clean", 0.60),
    Phase("flaky", 0.66),
    Phase("clean", 0.75),
)
NO_FAULTS = (Phase("clean", 0.0),)


def timeline(duration: float, schedule: tuple[Phase, ...]) -> list[tuple[float, str]]:
    """(seconds from the start, phase name) for each phase of a load."""
    return [(phase.start * duration, phase.name) for phase in schedule]


async def inject(
    proxy: ProxyProcess,
    *,
    duration: float,
    schedule: tuple[Phase, ...],
    set_phase: Callable[[str], None],
    seed: str,
) -> list[dict[str, object]]:
    """Run the schedule from now for ``duration`` seconds; return what was
    done when (seconds from the start), for the report."""
    # Not secrets: a seeded generator makes a run's faults repeatable.
    rng = random.Random(f"{seed}/faults")  # noqa: S311
    started = time.monotonic()
    log: list[dict[str, object]] = []

    async def order(op: str, **fields: int | None) -> None:
        log.append({"t": round(time.monotonic() - started, 2), "op": op, **fields})
        await proxy.order(op, **fields)

    phases = timeline(duration, schedule)
    for number, (at, name) in enumerate(phases):
        end = phases[number + 1][0] if number + 1 < len(phases) else duration
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        set_phase(name)
        if name == "cut":
            while time.monotonic() < started + end:
                await order("cut", after=rng.randint(32 * KiB, 3 * MiB), times=None)
                await asyncio.sleep(1.0)
            # No "uncut" in LatencyProxy: a cut that may take no connection
            # disarms itself on the next byte of each.
            await order("cut", after=0, times=0)
        elif name == "stall":
            await order("stall", after=rng.randint(0, 1 * MiB), times=None)
            await asyncio.sleep(max(0.0, started + end - time.monotonic()))
            await order("release")
        elif name == "down":
            await order("refuse")
            await order("reset")
            await asyncio.sleep(max(0.0, started + end - time.monotonic()))
            await order("accept")
        elif name == "flaky":
            while time.monotonic() < started + end:
                await order("cut", after=rng.randint(32 * KiB, 2 * MiB), times=1)
                await asyncio.sleep(0.5)
            await order("cut", after=0, times=0)
    await asyncio.sleep(max(0.0, started + duration - time.monotonic()))
    return log
