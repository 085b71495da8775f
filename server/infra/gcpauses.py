"""How long the garbage collector stops the process: every collection timed into
`flashsale_gc_pause_seconds` (by generation), and one that stops it for `SLOW_SECONDS` or more
logged.

A full (generation 2) collection walks every object the process holds: with 15,000 open
sockets a web process holds about 1.5 million, and such a collection was estimated at seconds
on a loaded machine. Whether one falls in a sale's first seconds is what this shows
(`bin/bench queue`: the web processes' logs), without a profiler attached.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from server.infra.metrics import GC_PAUSE

logger = logging.getLogger(__name__)

# A collection that stops the process this long (s) or more is logged.
SLOW_SECONDS = 0.05

# The running collection's start, if any: (perf_counter, thread_time).
_started: list[tuple[float, float]] = []


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
    if took >= SLOW_SECONDS:
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


def time_gc_pauses() -> None:
    """Time every collection from now on (once per process: a second call changes nothing)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
