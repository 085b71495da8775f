"""Scenario: the sale's first second. A product with 100 units goes on sale a few seconds
ahead; 5,000 sockets watch it; at the start 5,000 shoppers each send one reservation.

Reported: units held (exactly the stock, never more), 5xx (none), the reservations' latency,
how long until every socket shows 0 left, and time series of latency and of the stock (the
operator's stats, polled, and the frames one socket received) for the charts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import httpx

from bench.fanout import Clients
from bench.rawhttp import now_ms
from bench.shoppers import Volley
from bench.spawn import host_port, shares, start_ready
from bench.stack import Target
from bench.wave import percentiles
from server.domain.clock import iso, parse_iso

POLL_SECONDS = 0.025


class StatsPoller(threading.Thread):
    """The operator's stats for one product, every POLL_SECONDS, until stopped."""

    def __init__(self, service: Target, product_id: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{service.base_url}/api/admin/products/{product_id}/stats"
        self.headers = service.admin_headers()
        self.samples: list[tuple[float, int, int, int]] = []  # (ms, available, held, sold)
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(headers=self.headers, timeout=10) as client:
            while not self.stopping.is_set():
                try:
                    stats = client.get(self.url).json()
                    self.samples.append(
                        (now_ms(), stats["available"], stats["held"], stats["sold"])
                    )
                except (httpx.HTTPError, ValueError, KeyError):
                    pass  # overloaded (503) or slow: the gap shows in the chart
                self.stopping.wait(POLL_SECONDS)

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


def _shoppers(
    service: Target, count: int, processes: int, volley: Volley
) -> list[subprocess.Popen[str]]:
    host, port = host_port(service)
    per = shares(count, processes)
    return start_ready(
        "bench.shoppers",
        [[host, str(port), str(n), *volley.args()] for n in per if n],
        what="shopper",
    )


def run(
    service: Target,
    *,
    shoppers: int = 5_000,
    sockets: int = 5_000,
    units: int = 100,
    lead_seconds: float | None = None,
    shopper_kind: str = "none",
    shoppers_ahead: float | None = None,
    keys: bool = False,
) -> dict[str, Any]:
    """The storm; `shopper_kind`: who the shoppers are (`bench/identities.py`); `keys`:
    every request carries an Idempotency-Key of its own.

    `shoppers_ahead`: open the shoppers' connections only this many seconds before the
    start (by default as soon as the sockets are open): a load balancer closes a
    connection that has sent no request for a while (HAProxy's `timeout http-request`),
    which a browser would open again but the shoppers do not."""
    # Time to open the sockets and the shoppers' connections before the start (10,000 took
    # about 2 s on a busy 2-core machine).
    lead = lead_seconds or 2.0 + (sockets + shoppers) / 2_000
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={
            "name": "Storm",
            "price": 1,
            "stock": units,
            "saleStartsAt": iso(int(now_ms() + lead * 1000)),
        },
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    product = response.json()
    start = float(parse_iso(product["saleStartsAt"]))
    ws_url = service.base_url.replace("http://", "ws://") + "/ws"
    body = json.dumps({"productId": product["id"], "quantity": 1})

    clients = Clients(ws_url, sockets, product["id"], max(1, min(4, sockets // 1_000)))
    poller = StatsPoller(service, product["id"])
    procs: list[subprocess.Popen[str]] = []
    try:
        if shoppers_ahead is not None:
            time.sleep(max(0.0, (start - now_ms()) / 1000 - shoppers_ahead))
        procs = _shoppers(
            service,
            shoppers,
            max(1, min(4, shoppers // 1_000)),
            Volley(start, body, shopper_kind, keys),
        )
        ready_before = (start - now_ms()) / 1000
        if ready_before < 0.2:
            raise RuntimeError(
                f"opening {sockets} sockets and {shoppers} connections took longer than the "
                f"{lead:.1f} s lead before the sale; give more with --storm-lead"
            )
        print(
            f"  {sockets} sockets and {shoppers} shoppers ready {ready_before:.1f} s before the "
            "start",
            flush=True,
        )
        time.sleep(max(0.0, (start - now_ms()) / 1000 - 0.5))
        poller.start()
        answers = []
        for proc in procs:
            assert proc.stdout is not None
            answers.append(json.loads(proc.stdout.readline()))
            proc.wait(30)
        # Every socket showing 0 left is the storm's end as a page sees it.
        deadline = time.monotonic() + 10
        while True:
            zero_times, missing = clients.available(0)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        series = clients.series()
    finally:
        if poller.is_alive():
            poller.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        clients.close()

    stats = httpx.get(poller.url, headers=poller.headers).json()
    rows = [row for answer in answers for row in answer["results"]]
    statuses = Counter(str(status) for _, _, status, _ in rows)
    codes = Counter(code for _, _, _, code in rows if code)
    answered = [row for row in rows if row[2]]
    latencies = [done - sent for sent, done, _, _ in answered]
    first_sent = min(sent for sent, _, _, _ in rows)
    last_sent = max(sent for sent, _, _, _ in rows)
    last_answer = max((done for _, done, _, _ in answered), default=start)
    result: dict[str, Any] = {
        "shopper_kind": shopper_kind,
        "keys": keys,
        "shoppers": shoppers,
        "sockets": sockets,
        "units": units,
        "held": statuses.get("201", 0),
        "stats_after": stats,
        "statuses": dict(statuses),
        "codes": dict(codes),
        "errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "no_answer": statuses.get("0", 0),
        "send_ms": {"first": round(first_sent - start, 2), "last": round(last_sent - start, 2)},
        "latency_ms": {k: round(v, 1) for k, v in _percentiles(latencies).items()},
        "answered_in_ms": round(last_answer - start, 1),
        "rps": round(len(answered) / max(0.001, (last_answer - first_sent) / 1000)),
        "sockets_at_zero_ms": percentiles([round(t - start) for t in zero_times]),
        "sockets_never_zero": missing,
        "shopper_cpu_seconds": round(sum(a["cpu_seconds"] for a in answers), 2),
        "series": {
            "latency": [
                [round(done - start, 1), round(done - sent, 2), status]
                for sent, done, status, _ in answered
            ],
            "stats": [[round(t - start, 1), a, h, s] for t, a, h, s in poller.samples],
            "frames": [[round(t - start, 1), a] for t, a in series],
        },
    }
    zero = result["sockets_at_zero_ms"]
    lat = result["latency_ms"]
    print(
        f"  held {result['held']} of {units}; 5xx {result['errors_5xx']}; statuses "
        f"{dict(statuses)}; latency p50 {lat.get('p50')} p99 {lat.get('p99')} max "
        f"{lat.get('max')} ms; every socket at 0 after {zero.get('max')} ms "
        f"({missing} never); {result['rps']} req/s",
        flush=True,
    )
    return result


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1]}
