"""SingleFlight: concurrent callers of one key share one execution.

The work runs in its own task, so a caller that gives up (a client that
disconnects) does not cancel it for the others; every caller gets the same
result or the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._calls

    async def do(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Run `work()` unless a call for `key` is running; await its result.

        Raises whatever `work()` raised.
        """
        task = self._calls.get(key)
        if task is None:
            task = asyncio.create_task(work())
            self._calls[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        # Every caller may have gone away; retrieve the exception so asyncio
        # does not report it as never retrieved.
        if not task.cancelled():
            task.exception()

    async def cancel_all(self) -> None:
        """Cancel every running call and wait for them (shutdown)."""
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
