"""Group commit: many concurrent callers, one transaction per batch.

Under a storm, thousands of requests want a transaction each. A write transaction costs
about the same whether it holds one reservation or a hundred (docs/design.md §9.2;
bench/README.md has the figures), so one task runs the requests that accumulated while the
previous batch was in flight, all together. A lone request still goes at once: nothing
waits for a batch to fill.

A `GroupCommit` made with a `key` (the reservations': the product) keeps, per key, the
time batches holding it have spent in the database and how many of them the database
found busy (`Busy`: a lock held past the busy timeout): a `Patience` reads both to tell a
request's own waiting from the database's work on its key (server/service/shop.py: the
reservation deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from server.domain.errors import DomainError
from server.storage.errors import Busy, Unavailable

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

# What a batch function returns for each request: its result, or the exception to raise.
BatchFunction = Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]]


class Check(Protocol):
    """Looked at as a request's batch is formed: the exception to answer it with instead
    of carrying it out (None: it goes)."""

    def refusal(self) -> BaseException | None: ...


class GroupCommit(Generic[Req, Res]):
    """Runs the requests `submit`ted, at most `max_batch` a batch, one batch at a time,
    through `run_batch` (each request's result or exception, in order).

    `key` (optional): what a request's batch works on in the database (the product of a
    reservation). With it, `database_s(key)` is the time (s, the event loop's clock)
    batches holding `key` have spent in `run_batch` so far, counting the batch in flight,
    and `refused(key)` how many of them the database found busy (`Busy`). One
    entry per key ever in a batch (the shop's products)."""

    def __init__(
        self,
        run_batch: BatchFunction[Req, Res],
        *,
        max_batch: int,
        name: str = "group-commit",
        key: Callable[[Req], Hashable] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._name = name
        self._key = key
        # Submitted, not yet in a batch: each request, its caller's future, its check.
        self._pending: list[tuple[Req, asyncio.Future[Res], Check | None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Requests taken into batches so far (tests/interleaving.py follows the batches).
        self.requests = 0
        # Per key: seconds its batches spent in the database (finished ones), and how many
        # the database refused; the batch in flight: its keys and when it went.
        self._database_s: dict[Hashable, float] = {}
        self._refused: dict[Hashable, int] = {}
        self._flight_keys: frozenset[Hashable] = frozenset()
        self._flight_since = 0.0

    @property
    def backlog(self) -> int:
        """Requests submitted and not yet in a batch."""
        return len(self._pending)

    def database_s(self, key: Hashable) -> float:
        """Seconds (the loop's clock) batches holding `key` have been in the database, the
        one in flight included."""
        spent = self._database_s.get(key, 0.0)
        if key in self._flight_keys:
            spent += asyncio.get_running_loop().time() - self._flight_since
        return spent

    def refused(self, key: Hashable) -> int:
        """How many batches holding `key` the database found busy (`Busy`)."""
        return self._refused.get(key, 0)

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

    async def submit(self, request: Req, *, check: Check | None = None) -> Res:
        """`request`'s result, from its batch. `check`: looked at as its batch is formed;
        if it gives an exception, the request is not carried out and that is raised.

        No timer per request (one cost ~80 µs a request in a storm of 20,000 submits): a
        request is looked at when the batches ahead of it are done."""
        # If the caller goes away its future is cancelled, but the request is still carried
        # out: it may already be in a transaction, and a hold made for nobody simply expires.
        return await self.submit_nowait(request, check=check)

    def submit_nowait(self, request: Req, *, check: Check | None = None) -> asyncio.Future[Res]:
        """`submit` for a caller that is not a coroutine: the future of `request`'s result
        (or exception), set when its batch is done. Raises RuntimeError when not running."""
        if self._task is None:
            raise RuntimeError(f"{self._name} is not running")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future, check))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._run_once()

    async def _run_once(self) -> None:
        taken = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        batch = []
        for request, future, check in taken:
            refusal = None if check is None else check.refusal()
            if refusal is None:
                batch.append((request, future))
            elif not future.done():  # its caller may have gone away
                future.set_exception(refusal)
        if not batch:
            return
        self.requests += len(batch)
        await self._settle(batch)

    async def _settle(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        keys: frozenset[Hashable] = frozenset()
        if self._key is not None:
            keys = frozenset(self._key(request) for request, _ in batch)
        loop = asyncio.get_running_loop()
        self._flight_keys, self._flight_since = keys, loop.time()
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
                self._landed(keys, refused=False)
                for item in batch:
                    await self._settle([item])
                return
            results = [exc] * len(batch)
            # Busy: a lock held past the busy timeout, which the next try would wait for
            # too. Not Unavailable: a connection the database closed (an idle one it ended
            # while the host was cut off) fails one batch, and the next gets another.
            self._landed(keys, refused=isinstance(exc, Busy))
        else:
            self._landed(keys, refused=False)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller went away
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _landed(self, keys: frozenset[Hashable], *, refused: bool) -> None:
        """The batch in flight, of `keys`, is back from the database."""
        spent = asyncio.get_running_loop().time() - self._flight_since
        self._flight_keys = frozenset()
        for key in keys:
            self._database_s[key] = self._database_s.get(key, 0.0) + spent
            if refused:
                self._refused[key] = self._refused.get(key, 0) + 1


class Patience:
    """How long a request waits for the database on others' account, measured on
    `batches` for its `key`: `waited_s()` is the time (s) since it came in, less the time
    batches of its key spent in the database meanwhile (that was the database's work on
    its key, a lock wait included: bounded by the database's own busy timeout, never the
    request's to count). `refused()`: whether a batch of its key the database found busy
    came back since it came in."""

    __slots__ = ("_batches", "_excused", "_key", "_refused", "_since")

    def __init__(self, batches: GroupCommit[Any, Any], key: Hashable) -> None:
        self._batches = batches
        self._key = key
        self._since = asyncio.get_running_loop().time()
        self._excused = batches.database_s(key)
        self._refused = batches.refused(key)

    def waited_s(self) -> float:
        """Seconds it waited, not counting its key's batches in the database."""
        elapsed = asyncio.get_running_loop().time() - self._since
        return elapsed - (self._batches.database_s(self._key) - self._excused)

    def refused(self) -> bool:
        """Whether the database refused a batch of its key since it came in."""
        return self._batches.refused(self._key) != self._refused


def _worth_splitting(exc: Exception) -> bool:
    # A domain error, or a database that is busy or unavailable, would fail each one alike.
    return not isinstance(exc, (DomainError, Busy, Unavailable))
