"""Group commit: many concurrent callers, one transaction per batch.

Under a storm, thousands of requests want a transaction each. A write transaction costs
about the same whether it holds one reservation or a hundred (docs/design.md §9.2;
bench/README.md has the figures), so one task runs the requests that accumulated while the
previous batch was in flight, all together. A lone request still goes at once: nothing
waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from server.domain.errors import DomainError
from server.storage.errors import Busy, Unavailable

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

# What a batch function returns for each request: its result, or the exception to raise.
BatchFunction = Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]]


class GroupCommit(Generic[Req, Res]):
    def __init__(
        self, run_batch: BatchFunction[Req, Res], *, max_batch: int, name: str = "group-commit"
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._name = name
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Requests taken into batches so far (tests/interleaving.py follows the batches).
        self.requests = 0

    @property
    def backlog(self) -> int:
        """Requests submitted and not yet in a batch."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Finish what was submitted, then stop."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self._wake.set()
        while self._pending:
            await self._run_once()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def submit(self, request: Req) -> Res:
        if self._task is None:
            raise RuntimeError(f"{self._name} is not running")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._wake.set()
        # If the caller goes away its future is cancelled, but the request is still carried
        # out: it may already be in a transaction, and a hold made for nobody simply expires.
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._run_once()

    async def _run_once(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self.requests += len(batch)
        await self._settle(batch)

    async def _settle(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            results = await self._run_batch([request for request, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) > 1 and _worth_splitting(exc):
                # One bad request must not fail the others: run each on its own.
                logger.warning(
                    "%s: a batch of %d failed (%r); retrying one by one",
                    self._name,
                    len(batch),
                    exc,
                )
                for item in batch:
                    await self._settle([item])
                return
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def _worth_splitting(exc: Exception) -> bool:
    # A domain error, or a database that is busy or unavailable, would fail each one alike.
    return not isinstance(exc, (DomainError, Busy, Unavailable))
