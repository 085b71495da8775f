"""Scenario: a steady shop. A minute of mixed traffic — 80% browse, 15% reserve, 3% complete,
2% cancel — with a short HOLD_SECONDS, so that most holds expire while the run goes on.

Reported: throughput (and as a share of the bare endpoint), latency per kind, statuses, and
the stock invariant `available + held + sold == total` for every product, read from the
operator's stats when the traffic stops and again once every hold has had time to expire
(then nothing may still be held: no leak). The load comes from separate processes
(bench/steadyload.py); their CPU is reported beside the service's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.stack import Target, cpu_seconds
from bench.steadyload import KINDS
from bench.wave import percentiles
from server.devtools.processes import Service

ROOT = Path(__file__).resolve().parent.parent
MIX = {"browse": 0.80, "reserve": 0.15, "complete": 0.03, "cancel": 0.02}
# Nine products that never run out and one that does (and comes back as holds expire).
PRODUCTS = [1_000_000] * 9 + [200]


def _stats(service: Target) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{service.base_url}/api/admin/stats", headers=service.admin_headers(), timeout=30
    )
    response.raise_for_status()
    stats: list[dict[str, Any]] = response.json()
    return stats


def _invariant(stats: list[dict[str, Any]], products: list[int]) -> list[dict[str, Any]]:
    """The products whose units do not add up."""
    return [
        s
        for s in stats
        if s["productId"] in products
        and (s["available"] + s["held"] + s["sold"] != s["total"] or s["available"] < 0)
    ]


def service_cpu(service: Service) -> Callable[[], tuple[float, float]]:
    """CPU seconds so far of the service's web processes and of its worker."""
    return lambda: (cpu_seconds(service.web.pid), cpu_seconds(service.worker.pid))


def run(
    service: Target,
    *,
    seconds: float,
    hold_seconds: float,
    connections: int = 64,
    processes: int = 2,
    sweep_seconds: float = 2,
    cpu: Callable[[], tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """`cpu` reads the CPU seconds of the web processes and of the workers so far (by
    default those of a `Service` this process started; a cluster's are on its hosts)."""
    if cpu is None:
        assert isinstance(service, Service), "`cpu` is needed for a service started elsewhere"
        cpu = service_cpu(service)
    address = urlsplit(service.base_url)
    products = []
    for i, stock in enumerate(PRODUCTS):
        response = httpx.post(
            f"{service.base_url}/api/admin/products",
            json={"name": f"Steady {i + 1}", "price": 9.99, "stock": stock},
            headers=service.admin_headers(),
        )
        response.raise_for_status()
        products.append(response.json()["id"])

    per = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    web_cpu, worker_cpu = cpu()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.steadyload",
                json.dumps(
                    {
                        "host": address.hostname or "127.0.0.1",
                        "port": address.port or 80,
                        "connections": n,
                        "seconds": seconds,
                        "mix": MIX,
                        "products": products,
                        "hold_seconds": hold_seconds,
                        "seed": i,
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i, n in enumerate(per)
    ]
    answers = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        if proc.returncode:
            raise RuntimeError(f"a steady-load process failed ({proc.returncode})")
        answers.append(json.loads(out))
    wall = time.monotonic() - started
    web_now, worker_now = cpu()
    web_cpu, worker_cpu = web_now - web_cpu, worker_now - worker_cpu
    after_run = _stats(service)

    # Every hold made is due by now + hold_seconds; the sweeper catches any job lost.
    time.sleep(hold_seconds + sweep_seconds + 1.0)
    settled = _stats(service)

    kinds: dict[str, Any] = {}
    total = 0
    for kind in KINDS:
        statuses: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        latencies: list[int] = []
        for answer in answers:
            k = answer["kinds"][kind]
            statuses.update(k["statuses"])
            codes.update(k["codes"])
            latencies += k["latencies_us"]
        count = sum(statuses.values())
        total += count
        kinds[kind] = {
            "requests": count,
            "rps": round(count / seconds, 1),
            "statuses": dict(statuses),
            "codes": dict(codes),
            "latency_ms": {k: round(v / 1000, 2) for k, v in percentiles(latencies).items()},
        }
    per_second = [sum(s) for s in zip(*(a["per_second"] for a in answers), strict=True)]
    generator_cpu = sum(a["cpu_seconds"] for a in answers)
    held_after = sum(s["held"] for s in settled if s["productId"] in products)
    result: dict[str, Any] = {
        "seconds": seconds,
        "hold_seconds": hold_seconds,
        "connections": connections,
        "mix": MIX,
        "requests": total,
        "rps": round(total / seconds, 1),
        "kinds": kinds,
        "errors_5xx": sum(
            n for k in kinds.values() for s, n in k["statuses"].items() if s.startswith("5")
        ),
        "no_answer": sum(k["statuses"].get("0", 0) for k in kinds.values()),
        "fallbacks": sum(a["fallbacks"] for a in answers),
        "invariant_broken_after_run": _invariant(after_run, products),
        "invariant_broken_settled": _invariant(settled, products),
        "held_after_expiry": held_after,
        "units": {
            key: sum(s[key] for s in settled if s["productId"] in products)
            for key in ("total", "available", "held", "sold", "expired", "cancelled")
        },
        "cpu": {
            "generator_share_of_core": round(generator_cpu / wall / processes, 2),
            "generator_us_per_request": round(generator_cpu * 1e6 / max(total, 1), 1),
            "web_share_of_core": round(web_cpu / wall, 2),
            "web_us_per_request": round(web_cpu * 1e6 / max(total, 1), 1),
            "worker_share_of_core": round(worker_cpu / wall, 2),
        },
        "series": {"per_second": per_second},
    }
    used = result["cpu"]
    print(
        f"  {result['rps']:.0f} req/s "
        + ", ".join(
            f"{k} {v['rps']:.0f}/s p99 {v['latency_ms'].get('p99')} ms" for k, v in kinds.items()
        )
        + f"; 5xx {result['errors_5xx']}; invariant "
        + ("holds" if not result["invariant_broken_settled"] else "BROKEN")
        + f"; held after expiry {held_after}; CPU: web {used['web_share_of_core']:.0%}, "
        f"load generator {used['generator_share_of_core']:.0%} of a core per process",
        flush=True,
    )
    return result
