"""Prometheus metrics, named by Prometheus conventions, for the web processes and the worker.

Web processes run in prometheus-client's multiprocess mode: `python -m server.web` gives them
one directory (PROMETHEUS_MULTIPROC_DIR, made fresh at each start and removed at exit, see
server/web.py), each process writes its values there, and `/metrics` adds them up, so the
numbers are right however many uvicorn workers answer. The worker serves its own on
`WORKER_METRICS_PORT`.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import defaultdict
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# -- the web processes ---------------------------------------------------------------------

REQUEST_DURATION = Histogram(
    "flashsale_http_request_duration_seconds",
    "Time to answer an HTTP request, by route (its path template), method and status class.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
RESERVATIONS = Counter(
    "flashsale_reservations_total",
    "Reservation requests by outcome: held, replayed (a repeated Idempotency-Key), "
    "insufficient_stock, sale_not_started, not_found, invalid, rate_limited, busy.",
    ["outcome"],
)
OVERLOADED = Counter(
    "flashsale_overload_rejections_total",
    "Requests answered 503 at once because too many were already in flight in the process.",
)
WEBSOCKETS = Gauge(
    "flashsale_websocket_connections",
    "Open /ws connections.",
    multiprocess_mode="livesum",
)
WEBSOCKETS_DROPPED = Counter(
    "flashsale_websocket_dropped_total",
    "Sockets closed by the server because they could not take frames.",
)
FANOUT_DURATION = Histogram(
    "flashsale_fanout_duration_seconds",
    "Time to hand one flush of live-update frames to every socket of a process.",
    buckets=LATENCY_BUCKETS,
)
PUBSUB_RECONNECTS = Counter(
    "flashsale_pubsub_reconnects_total",
    "Times a web process lost its Redis subscription and subscribed again.",
)

# -- both ----------------------------------------------------------------------------------

ENQUEUE_FAILURES = Counter(
    "flashsale_expiry_enqueue_failures_total",
    "Expiry jobs that could not be enqueued (the sweeper expires those holds).",
)
PUBLISH_FAILURES = Counter(
    "flashsale_event_publish_failures_total",
    "Attempts to publish live-update events that failed (they are retried).",
)
EVENTS_PUBLISHED = Counter(
    "flashsale_events_published_total", "Live-update frames published to Redis."
)
DATABASE_BUSY = Counter(
    "flashsale_database_busy_total",
    "Waits for another writer's lock: `retry` for each short wait before a write could "
    "begin, `gave_up` for writes answered 503 after the busy timeout.",
    ["result"],
)

# -- the worker ----------------------------------------------------------------------------

HOLDS_EXPIRED = Counter(
    "flashsale_holds_expired_total",
    "Holds expired, by what expired them: `job` (on time), `sweeper` (the safety net), "
    "`refusal` (a complete or cancel that came too late).",
    ["by"],
)
EXPIRY_LATENESS = Histogram(
    "flashsale_expiry_lateness_seconds",
    "From a hold's expiresAt to its units being back on sale.",
    buckets=LATENESS_BUCKETS,
)


class Deferred:
    """Increments and observations kept in process memory, written out within a second.

    In multiprocess mode each prometheus-client increment takes a lock, asks the kernel for
    the process id and writes a memory-mapped file; a histogram observation does that twice.
    On the request path that measured ~8 µs of a sold-out reservation's ~60 µs of CPU. Here
    an increment is a dict update, and the totals go to prometheus-client at most once a
    second (a timer on the running loop), and at shutdown.
    """

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self._counts: defaultdict[Any, float] = defaultdict(float)
        self._buckets: dict[Any, tuple[list[int], list[float]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        """Add to a counter child (`Counter.labels(...)` or an unlabelled `Counter`)."""
        self._counts[counter] += amount
        self._schedule()

    def observe(self, histogram: Any, value: float) -> None:
        """Observe a value of a histogram child."""
        pending = self._buckets.get(histogram)
        if pending is None:
            pending = self._buckets[histogram] = ([0] * len(histogram._upper_bounds), [0.0])
        counts, total = pending
        # The first bucket whose upper bound is >= value, as Histogram.observe picks it.
        counts[bisect_left(histogram._upper_bounds, value)] += 1
        total[0] += value
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, defaultdict(float)
        for counter, amount in counts.items():
            counter.inc(amount)
        buckets, self._buckets = self._buckets, {}
        for histogram, (bucket_counts, total) in buckets.items():
            # prometheus-client has no public call to add many observations at once; these
            # are the attributes its own observe() updates (pinned below 0.27 in pyproject).
            histogram._sum.inc(total[0])
            for bucket, count in zip(histogram._buckets, bucket_counts, strict=True):
                if count:
                    bucket.inc(count)


DEFERRED = Deferred()


def render() -> tuple[bytes, str]:
    """The current values in Prometheus' text format, added up over every process."""
    DEFERRED.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
