"""Scenario: the request paths under load, each as a share of the bare endpoint's rate.

(a) reservations with ample stock, (b) reservations of a sold-out product, (c) the product
list with and without If-None-Match, and a page of it (the newest 100, as the shop page asks
once a shop has more), (d) completing holds, each request a different ACTIVE
hold (made beforehand, straight into the database), and the bare endpoint before and
after, all at the same concurrency, in the same run.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

import httpx

from bench import identities, wrk
from bench.stack import Bare, cpu_seconds
from server.devtools.processes import Service
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import HoldRequest
from server.storage.database import Store

# Holds made for (d): more than the path completes in its run (~5,000/s here), so that
# every request completes a fresh one.
COMPLETE_HOLDS_PER_SECOND = 8_000
HOLD_BATCH = 1_000
# Distinct shoppers in the (a) runs "many shoppers" (issue 16): a sale's many, each request
# the next of them, beside the one shopper of the other identified runs.
POOL = 1_000


@dataclass
class Row:
    name: str
    result: wrk.Result
    cpu_us_per_request: float | None

    def as_dict(self, bare_rps: float) -> dict[str, Any]:
        return {
            "scenario": self.name,
            **self.result.as_dict(),
            "share_of_bare": round(self.result.rps / bare_rps, 3),
            "cpu_us_per_request": self.cpu_us_per_request,
        }


def _product(service: Service, stock: int) -> int:
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={"name": f"Bench {stock}", "price": 1, "stock": stock},
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    product_id: int = response.json()["id"]
    return product_id


async def _make_holds(database_url: str, product_id: int, count: int) -> list[str]:
    """`count` ACTIVE holds of one unit, an hour long, written straight to the database."""
    store = Store(database_url)
    await store.connect()
    ids: list[str] = []
    try:
        for start in range(0, count, HOLD_BATCH):
            requests = [HoldRequest(product_id, 1)] * min(HOLD_BATCH, count - start)
            outcomes, _ = await store.write(
                functools.partial(
                    inventory.reserve, requests=requests, now=now_ms(), hold_ms=3_600_000
                )
            )
            ids += [o.result().reservation.id for o in outcomes]
    finally:
        await store.close()
    return ids


def _measure(name: str, base_url: str, load: wrk.Load, pid: int | None) -> Row:
    before = cpu_seconds(pid) if pid else 0.0
    result = wrk.run(base_url, load)
    cpu = None
    if pid:
        cpu = round((cpu_seconds(pid) - before) * 1e6 / max(result.requests, 1), 1)
    print(
        f"  {name:<34} {result.rps:>9.0f} req/s   p50 {result.p50_us / 1000:6.2f} ms   "
        f"p99 {result.p99_us / 1000:6.2f} ms",
        flush=True,
    )
    return Row(name, result, cpu)


def run(
    service: Service,
    bare: Bare,
    *,
    seconds: float,
    connections: int,
    bare_before: wrk.Result | None = None,
    database_url: str | None = None,
    with_identities: bool = True,
) -> list[dict[str, Any]]:
    """The rows; `bare_before`, when given, is the bare endpoint measured just before (at the
    same load), taken as the first row instead of measuring it again. (d) is measured when
    `database_url` (the service's database) is given. `with_identities`: (a) also with a
    shopper's cookie and a shop's JWT, and anonymous again (what knowing the shopper costs,
    which no history changes: the history scenario leaves them out)."""
    ample = _product(service, 1_000_000_000)
    sold_out = _product(service, 0)
    to_complete: list[str] = []
    if database_url is not None:
        count = round(seconds * COMPLETE_HOLDS_PER_SECOND)
        to_complete = asyncio.run(_make_holds(database_url, _product(service, count), count))

    def load(path: str, **kwargs: Any) -> wrk.Load:
        return wrk.Load(path, connections=connections, seconds=seconds, **kwargs)

    def reserve(product_id: int, kind: str = "none", shoppers: int = 1) -> wrk.Load:
        # `shoppers` 1: one shopper for the whole run (wrk sends the same headers every
        # time): the most any one shopper's allowance row is written, the worst case of its
        # cost. More: each request the next of that many distinct shoppers, as in a sale.
        who = identities.headers(kind, shoppers)
        rotate = None
        if shoppers > 1:
            (name,) = who[0]
            rotate = (name, [w[name] for w in who])
        return load(
            "/api/reservations",
            method="POST",
            body=json.dumps({"productId": product_id, "quantity": 1}),
            headers={"Content-Type": "application/json", **who[0]},
            rotate=rotate,
        )

    pid = service.web.pid
    before = (
        Row("bare endpoint (before)", bare_before, None)
        if bare_before is not None
        else _measure("bare endpoint (before)", bare.base_url, load("/"), None)
    )
    rows = [
        before,
        _measure("(a) reserve, ample stock", service.base_url, reserve(ample), pid),
    ]
    if with_identities:
        rows += [
            _measure(
                "(a) reserve, ample stock, a shopper's cookie",
                service.base_url,
                reserve(ample, "cookie"),
                pid,
            ),
            _measure(
                "(a) reserve, ample stock, a shop's JWT",
                service.base_url,
                reserve(ample, "jwt"),
                pid,
            ),
            _measure(
                f"(a) reserve, ample stock, {POOL:,} shoppers' cookies",
                service.base_url,
                reserve(ample, "cookie", POOL),
                pid,
            ),
            _measure(
                f"(a) reserve, ample stock, {POOL:,} shoppers' JWTs",
                service.base_url,
                reserve(ample, "jwt", POOL),
                pid,
            ),
            # Anonymous once more: how far the machine's load drifted over the three.
            _measure(
                "(a) reserve, ample stock, anonymous again", service.base_url, reserve(ample), pid
            ),
        ]
    rows += [
        _measure("(b) reserve, sold out", service.base_url, reserve(sold_out), pid),
        _measure("(c) GET /api/products → 200", service.base_url, load("/api/products"), pid),
    ]
    # Read after (a) has changed the stock, and nothing changes it during this run.
    etag = httpx.get(f"{service.base_url}/api/products").headers["etag"]
    rows += [
        _measure(
            "(c) GET /api/products → 304",
            service.base_url,
            load("/api/products", headers={"If-None-Match": etag}),
            pid,
        ),
        _measure(
            "(c) a page: GET /api/products?limit=100 → 200",
            service.base_url,
            load("/api/products?limit=100"),
            pid,
        ),
    ]
    if to_complete:
        row = _measure(
            "(d) complete a hold",
            service.base_url,
            load(
                "/api/reservations/-/complete",
                method="POST",
                paths=[f"/api/reservations/{i}/complete" for i in to_complete],
            ),
            pid,
        )
        if row.result.requests > len(to_complete):
            print(f"  (d) ran out of holds: {len(to_complete):,} were fresh", flush=True)
        rows.append(row)
    rows.append(_measure("bare endpoint (after)", bare.base_url, load("/"), None))
    bare_rps = (rows[0].result.rps + rows[-1].result.rps) / 2
    return [row.as_dict(bare_rps) for row in rows]
