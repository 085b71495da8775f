"""Prometheus metrics, named by Prometheus conventions, for the web processes and the worker.

Web processes run in prometheus-client's multiprocess mode: `python -m server.web` gives them
one directory (PROMETHEUS_MULTIPROC_DIR, made fresh at each start and removed at exit, see
server/web.py), each process writes its values there, and the metrics server adds them up,
so the numbers are right however many uvicorn workers answer. That server (`serve`) listens
on a port of its own, `WEB_METRICS_PORT`, started by `python -m server.web` beside uvicorn: a
scrape never reaches the shoppers' port, never waits behind their requests and never runs on
their event loop. The worker serves its own on `WORKER_METRICS_PORT`.

Every label value is from a closed set: routes are path templates (`unmatched` for every
path no route knows), methods are the standard ones (`other` for the rest), statuses are
classes. A label taken from the request as it came would let any client create series
without end: 735 requests with invented methods and unknown paths once grew the page from
6.8 KB to 1.3 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

logger = logging.getLogger(__name__)

# The methods that get a label value of their own; any other is counted as `other`.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

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
    "insufficient_stock, sale_not_started, sale_paused, sale_ended, not_found, invalid, "
    "rate_limited, busy.",
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
QUEUE_JOIN_DURATION = Histogram(
    "flashsale_queue_join_duration_seconds",
    "Time from a waiting-room join over /ws being read off its socket to its answer (its "
    "ticket frame, or an error frame) being handed to the socket: the process's own part "
    "of a join's latency (not the time the message waited in the kernel for a busy event "
    "loop to read it, nor the answer's way back to the page).",
    buckets=LATENCY_BUCKETS,
)
GC_PAUSE = Histogram(
    "flashsale_gc_pause_seconds",
    "Time the garbage collector stopped the process for, by generation (0, 1, 2): a full "
    "collection walks every object the process holds (~1.5 million with 15,000 sockets).",
    ["generation"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REFUSALS = Counter(
    "flashsale_http_refusals_total",
    "Connections or requests refused before they reached the application, by reason: "
    "header_too_large, too_many_headers, url_too_long, header_timeout, body_timeout, "
    "malformed, too_many_connections, too_many_pipelined.",
    ["reason"],
)
SIGN_IN_THROTTLED = Counter(
    "flashsale_admin_sign_in_throttled_total",
    "Operator API requests refused 429 because their address failed to sign in too often.",
)
SHOP_KEY_THROTTLED = Counter(
    "flashsale_shop_key_throttled_total",
    "Completions with a bearer token refused 429 because their address sent too many wrong "
    "shop API keys.",
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
FRAMES_DROPPED = Counter(
    "flashsale_event_frames_dropped_total",
    "Reservation frames dropped, oldest first, because Redis stayed unreachable while more "
    "than 50,000 waited to be published (their pages learn the outcome otherwise).",
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
    "`refusal` (a complete or cancel that came too late), `reservation` (a reservation short "
    "of stock took back the units of overdue holds).",
    ["by"],
)
EXPIRY_LATENESS = Histogram(
    "flashsale_expiry_lateness_seconds",
    "From a hold's expiresAt to its units being back on sale.",
    buckets=LATENESS_BUCKETS,
)

LEDGER_UNRECONCILED = Gauge(
    "flashsale_ledger_unreconciled_products",
    "Products whose stock ledger did not add up at the worker's last reconciliation "
    "(0 is the only good value).",
    multiprocess_mode="max",
)
LEDGER_RECONCILIATIONS = Counter(
    "flashsale_ledger_reconciliations_total",
    "The worker's reconciliations of the ledger, by result: ok, unreconciled, failed.",
    ["result"],
)
WEBHOOK_DELIVERIES = Counter(
    "flashsale_webhook_attempts_total",
    "Webhook delivery attempts, by result: delivered, failed (non-2xx or no answer).",
    ["result"],
)
WEBHOOK_LATENESS = Histogram(
    "flashsale_webhook_delivery_lateness_seconds",
    "From an event's commit to its first successful delivery to an endpoint.",
    buckets=LATENESS_BUCKETS,
)
WEBHOOK_PENDING = Gauge(
    "flashsale_webhook_pending_deliveries",
    "Deliveries waiting to go or to be retried, at the worker's last look.",
    multiprocess_mode="max",
)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "flashsale_webhook_endpoints_disabled_total",
    "Endpoints the worker disabled because they kept failing for WEBHOOK_RETRY_HOURS.",
)
RETENTION_REMOVED = Counter(
    "flashsale_retention_removed_rows_total",
    "Rows removed for being older than RETENTION_DAYS, by table.",
    ["table"],
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


def method_label(method: str) -> str:
    """`method` if it is a standard one, else `other` (a closed set of label values)."""
    return method if method in KNOWN_METHODS else "other"


def render() -> tuple[bytes, str]:
    """The current values in Prometheus' text format, added up over every process."""
    DEFERRED.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# A scrape rendered within this many seconds is served again as it is: however often the
# port is polled, the files are read at most once a second (Prometheus scrapes every 15 s
# or so). Metrics are written out up to a second late anyway (`Deferred`).
RENDER_MAX_AGE_S = 1.0
# How long one connection to the metrics port may take to send its request.
SCRAPE_TIMEOUT_S = 5.0
# Connections served at once; one more is closed as soon as it is accepted. A scrape takes
# milliseconds, so this many only ever fill up with connections that send nothing.
MAX_SCRAPERS = 8


class _Exposition:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._page: tuple[bytes, str] | None = None
        self._at = 0.0

    def page(self) -> tuple[bytes, str]:
        with self._lock:
            now = time.monotonic()
            if self._page is None or now - self._at >= RENDER_MAX_AGE_S:
                self._page = render()
                self._at = now
            return self._page


class _ScrapeHandler(BaseHTTPRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # socket timeout: a silent connection is dropped
    exposition = _Exposition()

    def do_GET(self) -> None:
        if self.path.partition("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body, media_type = self.exposition.page()
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape


class _ScrapeServer(ThreadingHTTPServer):
    """A thread per connection, at most `MAX_SCRAPERS` of them, each connection timed out
    after `SCRAPE_TIMEOUT_S`; beyond that, a new connection is closed at once. (One
    connection at a time, as before, let each silent connection hold every scrape up for
    the whole timeout; prometheus-client's own server gives every connection a thread and
    waits on it forever.)"""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _ScrapeHandler)
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        if isinstance(request, socket.socket):
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        self.close_request(request)


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Serve `/metrics` on `host:port` from a daemon thread; returns the server.

    At most `MAX_SCRAPERS` connections at a time, each given `SCRAPE_TIMEOUT_S` to send its
    request (more are closed as they arrive), the page rendered at most once a second:
    whatever reaches this port, it costs the process a bounded number of threads and a
    bounded share of a core. Raises OSError if the port cannot be bound. The port is for
    Prometheus, not the public: a proxy in front must not route to it (README, "Limits").
    Used by the web processes (server/web.py) and the worker (jobs/__main__.py).
    """
    server = _ScrapeServer((host, port))
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server
