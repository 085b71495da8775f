"""How long the garbage collector stops the process: every collection timed into
`flashsale_gc_pause_seconds` (by generation), and one that stops it for `SLOW_SECONDS` or more
logged.

A full (generation 2) collection walks every object the process holds: with 15,000 open
sockets a web process holds about 1.5 million, and such a collection was estimated at seconds
on a loaded machine. Whether one falls in a sale's first seconds is what this shows
(`bin/bench queue`: the web processes' logs), without a profiler attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from server.infra.metrics import GC_PAUSE

logger = logging.getLogger(__name__)

# A collection that stops the process this long (s) or more is logged.
SLOW_SECONDS = 0.05

# The running collection's start, if any: (perf_counter, thread_time).
_started: list[tuple[float, float]] = []
# Set while collections are timed but not logged (`unlogged`).
_unlogged: list[bool] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[:] = [(time.perf_counter(), time.thread_time())]
        return
    if not _started:
        return  # installed mid-collection
    began, cpu_began = _started.pop()
    took = time.perf_counter() - began
    generation = int(info.get("generation", 0))
    GC_PAUSE.labels(str(generation)).observe(took)
    if took >= SLOW_SECONDS and not _unlogged:
        # Its CPU beside it: on a machine busier than its cores, a collection's wall time
        # is mostly waiting for a core.
        logger.warning(
            "gc: a generation %d collection stopped the process for %.0f ms (%.0f ms of CPU; "
            "%d collected)",
            generation,
            took * 1000,
            (time.thread_time() - cpu_began) * 1000,
            int(info.get("collected", 0)),
        )


@contextlib.contextmanager
def unlogged() -> Iterator[None]:
    """Collections inside are timed into the metric but not logged, however long: the
    start's own full collection, before anyone can be kept waiting by it, was a WARNING
    at every start."""
    _unlogged.append(True)
    try:
        yield
    finally:
        _unlogged.pop()


def time_gc_pauses() -> None:
    """Time every collection from now on (once per process: a second call changes nothing)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


# -- no collections in a sale's first seconds ----------------------------------------------

# The collector is off from this long before a sale's start (s)...
QUIET_BEFORE_S = 2.0
# ...until this long after it (s): a waiting room's storm of joins, the admitted shoppers'
# reservations, the last unit sold and the room's close (its bench: 3-6 s on a loaded
# machine).
QUIET_AFTER_S = 10.0
# A quiet spell lasts at most this long (s), and the next may begin only this long after
# it ended: sales starting one after another cannot keep the collector off, and what is
# not collected meanwhile (cycles that became garbage) is bounded by what the process
# allocates in that time.
QUIET_MAX_S = 15.0
# How often the starts are looked at (s).
QUIET_CHECK_S = 0.25


class SaleQuiet:
    """Keeps the garbage collector off in a sale's first seconds, when a pause costs most.

    A web process with 15,000 open pages holds about 1.5 million objects; a generation-1
    collection among them took 190-230 ms of CPU, and a generation-0 one in a sale's first
    second 145-170 ms (the waiting room's bench, SQLite, one web process: the web log), on
    an event loop that a sale's 10,000 joins already keep short of CPU. Unlike other
    services, this one knows when its storms come: `starts()` gives the sales' start times
    (ms since the epoch, the catalog's `saleStartsAt`), and from `QUIET_BEFORE_S` before one
    until `QUIET_AFTER_S` after it the collector is off (`gc.disable`), at most
    `QUIET_MAX_S` at a time and never two spells closer than that. Collections then resume
    as their thresholds say (objects keep being counted meanwhile). Reference counting
    frees everything that is not in a cycle all the while: only cyclic garbage waits.

    `check(now_ms)` decides; `run()` checks every `QUIET_CHECK_S` (the time from `wall_ms`,
    ms since the epoch) until cancelled, and
    turns the collector back on when it ends. Only the collector this class turned off
    is turned on again: one that was off already (a test, a profiler) is left alone."""

    def __init__(
        self,
        starts: Callable[[], Iterable[int | None]],
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._starts = starts
        self._wall_ms = wall_ms
        self._since: float | None = None  # monotonic time this spell began, if quiet
        self._ended = -QUIET_MAX_S  # monotonic time the last spell ended
        self.spells = 0

    @property
    def quiet(self) -> bool:
        return self._since is not None

    def check(self, now_ms: int, clock: float | None = None) -> bool:
        """Turn the collector off or on for the sales' starts as of `now_ms`; True while it
        is off on this class's account. `clock`: monotonic seconds (tests give it)."""
        clock = time.monotonic() if clock is None else clock
        near = any(
            start is not None
            and now_ms - QUIET_AFTER_S * 1000 <= start <= now_ms + QUIET_BEFORE_S * 1000
            for start in self._starts()
        )
        if self._since is not None:
            if not near or clock - self._since >= QUIET_MAX_S:
                self._resume(clock)
        elif near and clock - self._ended >= QUIET_MAX_S and gc.isenabled():
            gc.disable()
            self._since = clock
            self.spells += 1
            logger.info("gc: off for a sale's first seconds")
        return self._since is not None

    def _resume(self, clock: float) -> None:
        self._since = None
        self._ended = clock
        gc.enable()

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.check(self._wall_ms())
                except Exception:
                    # A check that raises (the starts read wrong, say) is logged, and the
                    # next one runs as usual: the task is not to end for the process's life.
                    logger.exception("gc: the sales' starts could not be checked")
                await asyncio.sleep(QUIET_CHECK_S)
        finally:
            if self._since is not None:
                self._resume(time.monotonic())
