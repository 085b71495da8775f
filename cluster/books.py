"""The books, read straight from the data host's PostgreSQL (not through the service), and
the ledger's reconciliation through the operator API when the service has one.

Each check returns the list of what is wrong (empty: it holds), so that a drill can print
every failed line rather than stop at the first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

import asyncpg
import httpx


async def _rows(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(sql, *args)
        return rows
    finally:
        await connection.close()


async def unbalanced(database_url: str) -> list[str]:
    """Promise 1 for every product: `available + held + sold == total`, `available >= 0`,
    held and sold counted from the holds themselves; and, where the products keep counters
    of their held and sold units (migration 0002), the counters agree with the holds."""
    counters = await _has_column(database_url, "products", "held_units")
    rows = await _rows(
        database_url,
        "SELECT p.id, p.total_stock AS total, p.available_stock AS available, "
        + ("p.held_units, p.sold_units, " if counters else "")
        + "COALESCE(SUM(r.quantity) FILTER (WHERE r.status = 'ACTIVE'), 0) AS held, "
        "COALESCE(SUM(r.quantity) FILTER (WHERE r.status = 'COMPLETED'), 0) AS sold "
        "FROM products p LEFT JOIN reservations r ON r.product_id = p.id "
        "GROUP BY p.id ORDER BY p.id",
    )
    problems = [
        f"product {r['id']}: available {r['available']} + held {r['held']} + sold "
        f"{r['sold']} != total {r['total']}"
        for r in rows
        if r["available"] < 0 or r["available"] + r["held"] + r["sold"] != r["total"]
    ]
    if counters:
        problems += [
            f"product {r['id']}: its counters say {r['held_units']} held, {r['sold_units']} "
            f"sold; its holds {r['held']} and {r['sold']}"
            for r in rows
            if (r["held_units"], r["sold_units"]) != (r["held"], r["sold"])
        ]
    return problems


async def _has_column(database_url: str, table: str, column: str) -> bool:
    rows = await _rows(
        database_url,
        "SELECT 1 FROM information_schema.columns WHERE table_name = $1 AND column_name = $2",
        table,
        column,
    )
    return bool(rows)


async def ledger_problems(database_url: str, product_ids: Collection[int]) -> list[str] | None:
    """Each hold's movements in the stock ledger (migration 0005), one by one: one `held`
    row, and one row for how it ended (`completed`, `cancelled` or `expired`, as its status
    says) once it has, for its quantity. None when there is no ledger."""
    if not await _has_column(database_url, "stock_ledger", "movement"):
        return None
    rows = await _rows(
        database_url,
        "SELECT r.id, r.status, r.quantity, l.movement, COUNT(l.movement) AS n, "
        "COALESCE(SUM(l.units), 0) AS units "
        "FROM reservations r LEFT JOIN stock_ledger l ON l.reservation_id = r.id "
        "AND l.product_id = r.product_id "
        "WHERE r.product_id = ANY($1::int[]) GROUP BY r.id, r.status, r.quantity, l.movement",
        list(product_ids),
    )
    seen: dict[str, dict[str, tuple[int, int]]] = {}
    status: dict[str, tuple[str, int]] = {}
    for r in rows:
        status[r["id"]] = (r["status"], r["quantity"])
        if r["movement"] is not None:
            seen.setdefault(r["id"], {})[r["movement"]] = (r["n"], r["units"])
    problems = []
    for hold, (state, quantity) in status.items():
        expected = {"held": (1, quantity)}
        if state != "ACTIVE":
            expected[state.lower()] = (1, quantity)
        if seen.get(hold, {}) != expected:
            problems.append(f"hold {hold} ({state}): ledger rows {seen.get(hold, {})}")
    return problems


async def holds(database_url: str, product_ids: Collection[int]) -> dict[str, dict[str, Any]]:
    """Every hold of these products: id → its row."""
    rows = await _rows(
        database_url,
        "SELECT id, product_id, quantity, status, created_at, expires_at, ended_at, "
        "idempotency_key "
        "FROM reservations WHERE product_id = ANY($1::int[])",
        list(product_ids),
    )
    return {str(r["id"]): dict(r) for r in rows}


def client_key(stored: str | None) -> str | None:
    """The Idempotency-Key a client sent, from the key as the service stores it: scoped to
    its caller, `<caller>\t<key>` (server/service/idempotency.py, `scoped_key`), so that a
    drill's shopper can be found by the key it sent."""
    return None if stored is None else stored.rpartition("\t")[2]


def lost(told: Collection[str], stored: Collection[str]) -> list[str]:
    """No hold lost, none made behind a shopper's back: the holds shoppers were told of
    (201) are exactly the holds the database has."""
    problems = [
        f"hold {h} was answered 201 but is not in the database" for h in told if h not in stored
    ]
    unknown = set(stored) - set(told)
    if unknown:
        problems.append(f"{len(unknown)} holds in the database that no shopper was told of")
    return problems


async def until_all_ended(
    database_url: str, product_ids: Collection[int], within: float
) -> dict[str, dict[str, Any]]:
    """Wait until no hold of these products is ACTIVE any more (the drills' holds are short
    and their shoppers have stopped); every hold's row."""
    deadline = time.monotonic() + within
    while True:
        found = await holds(database_url, product_ids)
        if all(h["status"] != "ACTIVE" for h in found.values()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def restored_once(database_url: str, product_ids: Collection[int]) -> list[str]:
    """Every expired hold restored exactly once: with no hold ACTIVE, a product's available
    stock must be its total less what was sold. A hold restored twice leaves more, one not
    restored leaves less (each product alone, so that errors cannot cancel out)."""
    rows = await _rows(
        database_url,
        "SELECT p.id, p.total_stock AS total, p.available_stock AS available, "
        "COALESCE(SUM(r.quantity) FILTER (WHERE r.status = 'COMPLETED'), 0) AS sold, "
        "COUNT(r.id) FILTER (WHERE r.status = 'ACTIVE') AS active "
        "FROM products p LEFT JOIN reservations r ON r.product_id = p.id "
        "WHERE p.id = ANY($1::int[]) GROUP BY p.id",
        list(product_ids),
    )
    problems = []
    for r in rows:
        if r["active"]:
            problems.append(f"product {r['id']}: {r['active']} holds still ACTIVE")
        elif r["available"] != r["total"] - r["sold"]:
            problems.append(
                f"product {r['id']}: available {r['available']}, but total {r['total']} "
                f"less sold {r['sold']} is {r['total'] - r['sold']}"
            )
    return problems


def lateness_ms(stored: dict[str, dict[str, Any]]) -> list[int]:
    """For each expired hold, how long after its expiresAt its units were back."""
    return sorted(
        int(h["ended_at"] - h["expires_at"])
        for h in stored.values()
        if h["status"] == "EXPIRED" and h["ended_at"] is not None
    )


async def reconciliation(base_url: str, admin_token: str) -> tuple[bool, str]:
    """`GET /api/admin/reconcile`, the ledger's own proof, when the service has a ledger:
    (present, what is wrong or "" when every product reconciles)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        response = await client.get(
            "/api/admin/reconcile", headers={"Authorization": f"Bearer {admin_token}"}
        )
    if response.status_code == 404:
        return False, ""
    if response.status_code != 200:
        return True, f"answered {response.status_code}: {response.text[:200]}"
    body = response.json()
    if body.get("ok") is True and not body.get("unreconciled"):
        return True, ""
    problems = [
        f"product {p.get('productId')}: {'; '.join(p.get('problems', []))}"
        for p in body.get("products", [])
        if not p.get("ok", True)
    ]
    return True, "; ".join(problems)[:500] or str(body)[:300]
