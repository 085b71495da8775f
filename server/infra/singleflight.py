"""One read at a time per key, shared by every caller that asks while it runs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Runs `read(key)` at most once at a time per key: a caller that asks while one runs
    for that key awaits the same run. Each run is a task of its own, so a caller that goes
    away (a request cancelled) does not cancel it for the others; it is forgotten when it
    ends, so the next ask after that reads again. Holds one entry per key being read, no
    more (callers bound the keys they ask for)."""

    def __init__(self, read: Callable[[K], Awaitable[V]], *, name: str) -> None:
        self._read = read
        self._name = name
        self._running: dict[K, asyncio.Task[V]] = {}

    async def __call__(self, key: K) -> V:
        """The result of the run for `key` under way, or of one started now. Raises what
        `read` raises."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._run(key), name=self._name)
            self._running[key] = task
            task.add_done_callback(functools.partial(self._ended, key))
        return await asyncio.shield(task)

    def _ended(self, key: K, task: asyncio.Task[V]) -> None:
        """A run is over: forget it, and take its exception, which its callers may all have
        gone without (asyncio would log "Task exception was never retrieved" at ERROR)."""
        self._running.pop(key, None)
        if not task.cancelled():
            task.exception()

    async def _run(self, key: K) -> V:
        return await self._read(key)
