"""Unit tests for mirror.singleflight: one execution per key at a time."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from mirror.singleflight import SingleFlight


class Work:
    """A unit of work the test releases by hand; counts how often it ran."""

    def __init__(self, result: str = "done", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return self.result


async def settle() -> None:
    """Let every ready task run until they all block again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work("blob")
    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(5)]
    await work.started.wait()
    await settle()
    assert flight.in_flight("k")
    assert all(not c.done() for c in callers)

    work.release.set()
    results = await asyncio.gather(*callers)

    assert results == ["blob"] * 5
    assert work.calls == 1
    assert not flight.in_flight("k")


async def test_every_caller_gets_the_same_exception() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    boom = ValueError("upstream broke")
    work = Work(error=boom)
    callers = [asyncio.create_task(flight.do("k", work)) for _ in range(3)]
    await work.started.wait()
    work.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)

    assert outcomes == [boom, boom, boom]
    assert all(o is boom for o in outcomes)
    assert work.calls == 1
    assert not flight.in_flight("k")


async def test_different_keys_run_separately() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    first, second = Work("one"), Work("two")
    a = asyncio.create_task(flight.do("a", first))
    b = asyncio.create_task(flight.do("b", second))
    await first.started.wait()
    await second.started.wait()
    first.release.set()
    second.release.set()
    assert list(await asyncio.gather(a, b)) == ["one", "two"]
    assert (first.calls, second.calls) == (1, 1)


async def test_cancelled_caller_does_not_cancel_the_work() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work("blob")
    quitter = asyncio.create_task(flight.do("k", work))
    stayer = asyncio.create_task(flight.do("k", work))
    await work.started.wait()
    await settle()

    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert flight.in_flight("k")
    assert not work.cancelled

    work.release.set()
    assert await stayer == "blob"
    assert work.calls == 1
    assert not work.cancelled


async def test_work_finishes_when_every_caller_gives_up() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work("blob")
    only = asyncio.create_task(flight.do("k", work))
    await work.started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    assert flight.in_flight("k")

    # A late caller joins the run that is still going.
    late = asyncio.create_task(flight.do("k", work))
    await settle()
    work.release.set()
    assert await late == "blob"
    assert work.calls == 1
    assert not work.cancelled


async def test_abandoned_failure_is_not_reported_as_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flight: SingleFlight[str, str] = SingleFlight()
        work = Work(error=ValueError("nobody is listening"))
        only = asyncio.create_task(flight.do("k", work))
        await work.started.wait()
        only.cancel()
        with pytest.raises(asyncio.CancelledError):
            await only
        work.release.set()
        await settle()
        assert not flight.in_flight("k")
        del only, work, flight
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_a_call_after_completion_runs_again() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    first = Work("one")
    first.release.set()
    assert await flight.do("k", first) == "one"
    assert not flight.in_flight("k")

    second = Work("two")
    second.release.set()
    assert await flight.do("k", second) == "two"
    assert (first.calls, second.calls) == (1, 1)


async def test_a_call_after_failure_runs_again() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    failing = Work(error=RuntimeError("once"))
    failing.release.set()
    with pytest.raises(RuntimeError, match="once"):
        await flight.do("k", failing)

    retry = Work("recovered")
    retry.release.set()
    assert await flight.do("k", retry) == "recovered"


async def test_cancel_all_cancels_running_work() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    a_work, b_work = Work(), Work()
    a = asyncio.create_task(flight.do("a", a_work))
    b = asyncio.create_task(flight.do("b", b_work))
    await a_work.started.wait()
    await b_work.started.wait()

    await flight.cancel_all()

    assert a_work.cancelled
    assert b_work.cancelled
    await settle()
    assert not flight.in_flight("a")
    assert not flight.in_flight("b")
    for caller in (a, b):
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_cancel_all_with_nothing_running() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    await flight.cancel_all()
    assert not flight.in_flight("k")


async def test_work_that_fails_to_start_propagates() -> None:
    flight: SingleFlight[str, str] = SingleFlight()

    def broken() -> Any:
        raise TypeError("not even a coroutine")

    with pytest.raises(TypeError, match="not even a coroutine"):
        await flight.do("k", broken)
    assert not flight.in_flight("k")
