"""Retention: what is older than RETENTION_DAYS leaves the tables, a bounded batch at a time.

- Holds that ended (COMPLETED, EXPIRED, CANCELLED) and were made before the cutoff. Open
  holds are never removed, and the cutoff is at least two days back, so every
  Idempotency-Key still in its day keeps its hold.
- Ledger rows before the cutoff that the reconciliation has proved (at or below the
  product's balance in `ledger_balances`): the balance carries their sum, so the ledger
  still adds up without them. Rows not yet proved wait for the next reconciliation, and a
  row whose outbox event is still kept stays with it (the event's body is rendered from it).
- Delivered webhook deliveries made before the cutoff, then outbox events made before it
  that have no delivery left (delivered everywhere, or wanted by no endpoint). An event
  still waiting for an endpoint is kept, however old.
- Waiting-room tickets that ended (reserved, sold_out, lapsed, left) before the cutoff.
  Open tickets (waiting, admitted) are never removed, however old. Before that, minutes
  after they ended, they are filed (`file_tickets`): nothing removed, an index moved.

Each function removes at most `limit` rows in one statement per table, choosing them
through an index in its order, so a batch costs the same with a month of history or a year.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.domain import outbox, webhooks
from server.domain.executor import Executor, Row

DAY_MS = 86_400_000


def _ids(names: dict[str, object]) -> str:
    return ", ".join(":" + name for name in names)


async def remove_holds(conn: Executor, *, cutoff: int, limit: int) -> int:
    """Remove up to `limit` ended holds made before `cutoff` (ms), oldest first."""
    rows = await conn.fetch_all(
        "SELECT id FROM reservations WHERE created_at < :cutoff AND ended_at IS NOT NULL "
        "ORDER BY created_at LIMIT :limit",
        {"cutoff": cutoff, "limit": limit},
    )
    if not rows:
        return 0
    names: dict[str, object] = {f"r{n}": str(row["id"]) for n, row in enumerate(rows)}
    await conn.execute(f"DELETE FROM reservations WHERE id IN ({_ids(names)})", names)
    return len(rows)


# Not a ledger row whose outbox event is still there: a reservation event's body is
# rendered from its ledger row at every delivery (`outbox.render`).
_EVENT_GONE = (
    "NOT EXISTS (SELECT 1 FROM outbox o WHERE o.product_id = stock_ledger.product_id "
    "AND o.version = stock_ledger.version AND o.seq = stock_ledger.seq)"
)


async def ledger_rows_to_remove(
    conn: Executor, product_id: int, *, cutoff: int, limit: int
) -> tuple[int, int] | None:
    """The lowest and highest versions of up to `limit` of a product's proved ledger rows
    from before `cutoff` whose outbox events are gone, oldest first (None: there are none),
    for `remove_ledger_rows`. Chosen among the rows that may go: the oldest `limit` rows,
    when all were kept with their events (an endpoint disabled with a day of events
    waiting), stopped the product's later old rows from going, run after run. The choice
    walks past the rows kept (on SQLite ~4 µs each at load 7: 0.4 s for 100,000), so it is
    read outside the write transaction, which the walk held as long."""
    balance = await conn.fetch_one(
        "SELECT version FROM ledger_balances WHERE product_id = :p", {"p": product_id}
    )
    if balance is None:
        return None
    rows = await conn.fetch_all(
        "SELECT version FROM stock_ledger WHERE product_id = :p AND at < :cutoff "
        f"AND version <= :proved AND {_EVENT_GONE} ORDER BY version LIMIT :limit",
        {"p": product_id, "cutoff": cutoff, "proved": int(balance["version"]), "limit": limit},
    )
    if not rows:
        return None
    return int(rows[0]["version"]), int(rows[-1]["version"])


async def remove_ledger_rows(
    conn: Executor, product_id: int, versions: tuple[int, int], *, cutoff: int
) -> int:
    """Remove a product's ledger rows of `versions` (lowest, highest: from
    `ledger_rows_to_remove`, whole versions: the rows of one change go together) from
    before `cutoff` whose outbox events are gone (checked again here, in the write)."""
    removed = await conn.fetch_all(
        "DELETE FROM stock_ledger WHERE product_id = :p AND version >= :low "
        f"AND version <= :high AND at < :cutoff AND {_EVENT_GONE} RETURNING seq",
        {"p": product_id, "low": versions[0], "high": versions[1], "cutoff": cutoff},
    )
    return len(removed)


async def ledgers_to_trim(
    conn: Executor, after: int, *, cutoff: int, limit: int
) -> tuple[list[int], int | None]:
    """Of the next `limit` products with a proved balance after id `after`, those with
    proved ledger rows from before `cutoff`; and the last id looked at (None: no more)."""
    rows = await conn.fetch_all(
        "SELECT b.product_id, EXISTS (SELECT 1 FROM stock_ledger l "
        "WHERE l.product_id = b.product_id AND l.at < :cutoff AND l.version <= b.version) "
        "AS old FROM ledger_balances b WHERE b.product_id > :after "
        "ORDER BY b.product_id LIMIT :limit",
        {"after": after, "cutoff": cutoff, "limit": limit},
    )
    last = int(rows[-1]["product_id"]) if len(rows) == limit else None
    return [int(row["product_id"]) for row in rows if row["old"]], last


async def remove_deliveries(conn: Executor, *, cutoff: int, limit: int) -> int:
    """Remove the delivered deliveries of up to `limit` events made before `cutoff`, oldest
    first (an event's deliveries to every endpoint that has it)."""
    rows = await conn.fetch_all(
        "SELECT DISTINCT event_id, created_at FROM webhook_deliveries "
        "WHERE created_at < :cutoff AND delivered_at IS NOT NULL "
        "ORDER BY created_at LIMIT :limit",
        {"cutoff": cutoff, "limit": limit},
    )
    if not rows:
        return 0
    names: dict[str, object] = {f"i{n}": str(row["event_id"]) for n, row in enumerate(rows)}
    removed = await conn.fetch_all(
        f"DELETE FROM webhook_deliveries WHERE event_id IN ({_ids(names)}) "
        "AND delivered_at IS NOT NULL AND created_at < :cutoff RETURNING endpoint_id",
        {"cutoff": cutoff, **names},
    )
    return len(removed)


async def remove_events(conn: Executor, *, cutoff: int, limit: int) -> int:
    """Remove up to `limit` dispatched events made before `cutoff` that no delivery waits
    for any more, oldest first."""
    # Not those still to be delivered (through each endpoint's pending deliveries, by the
    # outbox's key); those delivered and not yet removed are left out below, by their ids.
    rows = await conn.fetch_all(
        "SELECT o.product_id, o.version, o.seq, o.created_at, o.id FROM outbox o "
        "WHERE o.dispatched_at IS NOT NULL AND o.created_at < :cutoff "
        "AND NOT EXISTS (SELECT 1 FROM webhook_endpoints e JOIN webhook_deliveries d "
        "ON d.endpoint_id = e.id AND d.product_id = o.product_id AND d.version = o.version "
        "AND d.seq = o.seq AND d.delivered_at IS NULL) "
        "ORDER BY o.created_at LIMIT :limit",
        {"cutoff": cutoff, "limit": limit},
    )
    if not rows:
        return 0
    key = await webhooks.id_key(conn)
    ids: dict[str, Row] = {outbox.stored_event_id(key, row): row for row in rows}
    names: dict[str, object] = {f"i{n}": event for n, event in enumerate(ids)}
    kept = await conn.fetch_all(
        f"SELECT DISTINCT event_id FROM webhook_deliveries WHERE event_id IN ({_ids(names)})",
        names,
    )
    for row in kept:
        del ids[str(row["event_id"])]
    if not ids:
        return 0
    keys: dict[str, object] = {}
    which = []
    for n, row in enumerate(ids.values()):
        which.append(f"(product_id = :p{n} AND version = :v{n} AND seq = :s{n})")
        keys.update({f"p{n}": row["product_id"], f"v{n}": row["version"], f"s{n}": row["seq"]})
    await conn.execute(f"DELETE FROM outbox WHERE {' OR '.join(which)}", keys)
    return len(ids)


ENDED_TICKETS = ("reserved", "sold_out", "lapsed", "left")


async def remove_tickets(conn: Executor, *, cutoff: int, limit: int) -> int:
    """Remove up to `limit` waiting-room tickets that ended before `cutoff` (ms), those that
    ended first first, through the index of ended tickets (migration 0012). A ticket opened
    again meanwhile (a shopper who joins again: `ended_at` back to NULL) is not removed."""
    ended = ", ".join(f"'{state}'" for state in ENDED_TICKETS)
    rows = await conn.fetch_all(
        "SELECT product_id, shopper_id FROM queue_tickets "
        "WHERE ended_at IS NOT NULL AND ended_at < :cutoff ORDER BY ended_at LIMIT :limit",
        {"cutoff": cutoff, "limit": limit},
    )
    if not rows:
        return 0
    which, names = _tickets_named(rows)
    removed = await conn.fetch_all(
        f"DELETE FROM queue_tickets WHERE {which} "
        f"AND state IN ({ended}) AND ended_at < :cutoff RETURNING product_id",
        {"cutoff": cutoff, **names},
    )
    return len(removed)


# How long after it ended a ticket is filed (ms): after its room's close, when its pages
# have read its last state, and before the next sales' joins (`file_tickets`).
FILE_AFTER_MS = 10 * 60_000


async def file_tickets(conn: Executor, *, before: int, now: int, limit: int) -> int:
    """File up to `limit` waiting-room tickets that ended before `before` (ms) and are not
    filed yet, those that ended first first: `filed_at` = `now`, which moves each from the
    index of live tickets by shopper to the index of filed ones (migration 0021). Returns
    how many it filed.

    Why: that index is keyed by the random shopper id, so each entry written lands in a
    page of its own, which the commit writes out. A sale's joins write only the live
    index, which holds the tickets open or ended lately (a few rooms'), while the filed
    one holds RETENTION_DAYS of past rooms; its pages are written here, by the worker,
    `limit` tickets a transaction, some minutes after the sale (`FILE_AFTER_MS`). A ticket
    opened again meanwhile (`ended_at` back to NULL) is not filed; one opened again after
    it was filed stays filed, and is found the same (`waitingroom.tickets_of_shopper`)."""
    rows = await conn.fetch_all(
        "SELECT product_id, shopper_id FROM queue_tickets "
        "WHERE filed_at IS NULL AND ended_at IS NOT NULL AND ended_at < :before "
        "ORDER BY ended_at LIMIT :limit",
        {"before": before, "limit": limit},
    )
    if not rows:
        return 0
    which, names = _tickets_named(rows)
    return await conn.execute(
        f"UPDATE queue_tickets SET filed_at = :now WHERE {which} "
        "AND filed_at IS NULL AND ended_at IS NOT NULL AND ended_at < :before",
        {"before": before, "now": now, **names},
    )


def _tickets_named(rows: Sequence[Row]) -> tuple[str, dict[str, object]]:
    """A WHERE condition naming the tickets of `rows` (each with `product_id` and
    `shopper_id`), a product at a time, and its values."""
    by_product: dict[int, list[str]] = {}
    for row in rows:
        by_product.setdefault(int(row["product_id"]), []).append(str(row["shopper_id"]))
    names: dict[str, object] = {}
    parts = []
    for p, (product_id, shopper_ids) in enumerate(sorted(by_product.items())):
        names[f"p{p}"] = product_id
        these: dict[str, object] = {f"s{p}_{n}": s for n, s in enumerate(shopper_ids)}
        names.update(these)
        parts.append(f"(product_id = :p{p} AND shopper_id IN ({_ids(these)}))")
    return f"({' OR '.join(parts)})", names
