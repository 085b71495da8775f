"""A background task that drains work handed to it by synchronous callers.

Requests must not wait on Redis after their commit (docs/design.md §9.3: awaiting an enqueue and a
PUBLISH per request cost two thirds of the throughput), so they hand their side effects to
one of these and return; the task sends whatever has accumulated, in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)


class Drainer(ABC):
    name = "drainer"

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    async def drain(self) -> float | None:
        """Send what has accumulated. Return None when done, or the seconds to wait before
        trying again with the work it kept (the subclass decides what is worth keeping)."""

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, grace: float = 2.0) -> None:
        """Send what is left (for up to `grace` seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_idle(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait_idle(self) -> None:
        """Until everything handed over so far has been sent (or given up on)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                retry_after = await self.drain()
            except Exception:
                logger.exception("%s: unexpected failure", self.name)
                retry_after = 1.0
            if retry_after is not None and self.has_work():
                await asyncio.sleep(retry_after)
                self._wake.set()
            elif self.has_work():
                self._wake.set()
            else:
                self._idle.set()
