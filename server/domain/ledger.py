"""The stock ledger: one row per movement of a product's stock, and the proof that it adds up.

A row says which product moved, at which version (the product's `version` after the
change: every stock change raises it by one in its own UPDATE) and in which place among the
movements of that change (`seq`: a batch of holds is one change, one row per hold); what
moved (`Kind`), how many units, the hold it concerns, who did it (`actor`), when (ms), and
the product's units right after it: available, held, sold and total.

Rows are written by `server.domain.books.Books`, in the same transaction as the change;
every stock-moving operation goes through it (see that module). This module has the
movements, the reads, and the reconciliation.

Reconciliation proves, per product, that (1) the ledger adds up: walking its rows from the
last proved balance (`ledger_balances`), each row's units are the previous row's plus its
movement, and the last row's are the product row's units now, at its version; (2) it agrees
with the holds: the units of the open holds are the product's held units. A product where
either fails is named, with what disagrees. The worker then records each proved product's
balance, so the next reconciliation reads only the rows written since.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.domain.executor import Columns, Executor, Row, TableRows
from server.domain.model import Product, Reservation

# Who moves stock: a shopper (`shopper:<id>` when the shopper is known), the operator, the
# shop's backend (with a shop API key), or the worker (expiry).
OPERATOR = "operator"
SHOP = "shop"
WORKER = "worker"
SHOPPER = "shopper"


def shopper(shopper_id: str | None) -> str:
    """The actor for a shopper's request: `shopper:<id>`, or `shopper` when unknown."""
    return f"{SHOPPER}:{shopper_id}" if shopper_id else SHOPPER


class Kind(enum.StrEnum):
    """What moved. A later stock-moving operation adds its kind here, with its `DELTAS`."""

    CREATED = "created"
    RESTOCKED = "restocked"
    # The operator took units away (never more than are available: held and sold units stay).
    REDUCED = "reduced"
    HELD = "held"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Figures:
    """A product's units of stock: `available + held + sold == total`."""

    available: int = 0
    held: int = 0
    sold: int = 0
    total: int = 0

    def plus(self, other: Figures, times: int = 1) -> Figures:
        return Figures(
            self.available + other.available * times,
            self.held + other.held * times,
            self.sold + other.sold * times,
            self.total + other.total * times,
        )

    @classmethod
    def of(cls, product: Product) -> Figures:
        return cls(
            product.available_stock, product.held_units, product.sold_units, product.total_stock
        )

    @classmethod
    def from_row(cls, row: Row) -> Figures:
        return cls(int(row["available"]), int(row["held"]), int(row["sold"]), int(row["total"]))


# How one unit of each kind moves the figures.
DELTAS: dict[Kind, Figures] = {
    Kind.CREATED: Figures(available=1, total=1),
    Kind.RESTOCKED: Figures(available=1, total=1),
    Kind.REDUCED: Figures(available=-1, total=-1),
    Kind.HELD: Figures(available=-1, held=1),
    Kind.COMPLETED: Figures(held=-1, sold=1),
    Kind.CANCELLED: Figures(available=1, held=-1),
    Kind.EXPIRED: Figures(available=1, held=-1),
}


@dataclass(frozen=True, slots=True)
class Movement:
    """One movement of `units` units of stock, by `actor`, for `reservation` (if a hold's)."""

    kind: Kind
    units: int
    actor: str
    reservation: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A ledger row. `figures`: the product's units right after the movement."""

    product_id: int
    version: int
    seq: int
    kind: str
    reservation_id: str | None
    units: int
    figures: Figures
    actor: str
    at: int

    @classmethod
    def from_row(cls, row: Row) -> Entry:
        reservation = row["reservation_id"]
        return cls(
            product_id=int(row["product_id"]),
            version=int(row["version"]),
            seq=int(row["seq"]),
            kind=str(row["movement"]),
            reservation_id=None if reservation is None else str(reservation),
            units=int(row["units"]),
            figures=Figures.from_row(row),
            actor=str(row["actor"]),
            at=int(row["at"]),
        )


COLUMNS = (
    "product_id, version, seq, movement, reservation_id, units, available, held, sold, total, "
    "actor, at"
)
_TYPED: Columns = (
    ("product_id", "INTEGER"),
    ("version", "BIGINT"),
    ("seq", "INTEGER"),
    ("movement", "TEXT"),
    ("reservation_id", "TEXT"),
    ("units", "BIGINT"),
    ("available", "BIGINT"),
    ("held", "BIGINT"),
    ("sold", "BIGINT"),
    ("total", "BIGINT"),
    ("actor", "TEXT"),
    ("at", "BIGINT"),
)


async def insert(conn: Executor, entries: Sequence[Entry]) -> None:
    """Write `entries` (`Executor.insert_rows`: on PostgreSQL one statement of one JSON
    text, which cost it and the client less than 12 bound values a row did)."""
    await conn.insert_rows(*rows(entries))


# A ledger row's values, in `COLUMNS`' order (what `rows` makes of an `Entry`).
RowValues = tuple[int, int, int, str, str | None, int, int, int, int, int, str, int]


def rows_of(values: list[RowValues]) -> TableRows:
    """The ledger's rows from their values (`RowValues`), for `Executor.insert_many`."""
    return "stock_ledger", _TYPED, values


def rows(entries: Sequence[Entry]) -> TableRows:
    """`entries` as the ledger's rows, for `Executor.insert_rows` or `insert_many`."""
    return rows_of(
        [
            (
                e.product_id,
                e.version,
                e.seq,
                e.kind,
                e.reservation_id,
                e.units,
                e.figures.available,
                e.figures.held,
                e.figures.sold,
                e.figures.total,
                e.actor,
                e.at,
            )
            for e in entries
        ]
    )


# -- reads -------------------------------------------------------------------------------


async def entries(
    conn: Executor,
    product_id: int,
    *,
    limit: int,
    before: tuple[int, int] | None = None,
    since: int | None = None,
    until: int | None = None,
) -> list[Entry]:
    """Up to `limit` of a product's movements, newest first: those before the position
    `before` (version, seq: the cursor of the previous page), at or after `since` and
    before `until` (ms), when given. Reads from the primary key, or from the index by time
    when a range is asked for."""
    where = ["product_id = :p"]
    values: dict[str, object] = {"p": product_id, "limit": limit}
    if before is not None:
        where.append("(version < :bv OR (version = :bv AND seq < :bs))")
        values.update(bv=before[0], bs=before[1])
    if since is not None:
        where.append("at >= :since")
        values["since"] = since
    if until is not None:
        where.append("at < :until")
        values["until"] = until
    rows = await conn.fetch_all(
        f"SELECT {COLUMNS} FROM stock_ledger WHERE {' AND '.join(where)} "
        "ORDER BY version DESC, seq DESC LIMIT :limit",
        values,
    )
    return [Entry.from_row(row) for row in rows]


# -- reconciliation ----------------------------------------------------------------------

# Rows read per query while walking a product's ledger.
RECONCILE_PAGE = 5000


@dataclass(frozen=True, slots=True)
class Balance:
    """A product's units as of `version`, every ledger row up to it accounted for."""

    product_id: int
    version: int
    figures: Figures


@dataclass
class Reconciled:
    """One product's reconciliation: `ok` when the ledger adds up to the product's units
    and its open holds; otherwise `problems` says, one sentence each, what does not."""

    product_id: int
    version: int
    product: Figures
    ledger: Figures
    open_holds: int
    rows_checked: int
    since_version: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def reconcile(conn: Executor, product_ids: Sequence[int] | None = None) -> list[Reconciled]:
    """Reconcile every product (or those of `product_ids`), by id.

    `conn` must read one consistent snapshot (`Store.snapshot()`): the product rows, the
    ledger and the holds as of one instant. Reads the ledger rows written since each
    product's last proved balance, and the open holds (through the index of open holds).
    """
    products = await conn.fetch_all(
        "SELECT id, version, available_stock, held_units, sold_units, total_stock "
        "FROM products ORDER BY id"
    )
    wanted = None if product_ids is None else set(product_ids)
    balances = {
        b.product_id: b
        for b in (
            Balance(int(r["product_id"]), int(r["version"]), Figures.from_row(r))
            for r in await conn.fetch_all(
                "SELECT product_id, version, available, held, sold, total FROM ledger_balances"
            )
        )
    }
    held = {
        int(r["product_id"]): int(r["units"])
        for r in await conn.fetch_all(
            "SELECT product_id, SUM(quantity) AS units FROM reservations "
            "WHERE ended_at IS NULL GROUP BY product_id"
        )
    }
    results = []
    for row in products:
        product_id = int(row["id"])
        if wanted is not None and product_id not in wanted:
            continue
        now = Figures(
            int(row["available_stock"]),
            int(row["held_units"]),
            int(row["sold_units"]),
            int(row["total_stock"]),
        )
        start = balances.get(product_id, Balance(product_id, 0, Figures()))
        results.append(
            await _walk(conn, product_id, int(row["version"]), now, start, held.get(product_id, 0))
        )
    return results


async def _walk(
    conn: Executor, product_id: int, version: int, now: Figures, start: Balance, open_holds: int
) -> Reconciled:
    figures = start.figures
    last_version = start.version
    position = (start.version, 2**31 - 1)
    checked = 0
    problems: list[str] = []
    while True:
        rows = await conn.fetch_all(
            f"SELECT {COLUMNS} FROM stock_ledger WHERE product_id = :p "
            "AND (version > :v OR (version = :v AND seq > :s)) "
            "ORDER BY version, seq LIMIT :limit",
            {"p": product_id, "v": position[0], "s": position[1], "limit": RECONCILE_PAGE},
        )
        for row in rows:
            entry = Entry.from_row(row)
            checked += 1
            try:
                delta = DELTAS[Kind(entry.kind)]
            except ValueError:
                problems.append(
                    f"Row {entry.version}.{entry.seq} has an unknown movement {entry.kind!r}."
                )
                figures = entry.figures
                continue
            expected = figures.plus(delta, entry.units)
            if entry.figures != expected and len(problems) < 10:
                problems.append(
                    f"Row {entry.version}.{entry.seq} ({entry.kind} {entry.units}) says "
                    f"{_says(entry.figures)}; the rows before it add up to {_says(expected)}."
                )
            figures = entry.figures
            last_version = entry.version
        if len(rows) < RECONCILE_PAGE:
            break
        position = (int(rows[-1]["version"]), int(rows[-1]["seq"]))
    if figures != now:
        problems.append(f"The ledger adds up to {_says(figures)}; the product has {_says(now)}.")
    if last_version > version:
        problems.append(
            f"The ledger has rows at version {last_version}, past the product's {version}."
        )
    if open_holds != now.held:
        problems.append(
            f"Its open holds hold {open_holds} units; the product says {now.held} are held."
        )
    return Reconciled(
        product_id=product_id,
        version=version,
        product=now,
        ledger=figures,
        open_holds=open_holds,
        rows_checked=checked,
        since_version=start.version,
        problems=problems,
    )


def _says(f: Figures) -> str:
    return f"available {f.available}, held {f.held}, sold {f.sold}, total {f.total}"


async def record_balances(conn: Executor, proved: Sequence[Reconciled], *, now: int) -> None:
    """Keep the balance of each proved product (inside a write transaction), so that the
    next reconciliation starts from it. A balance only moves forward: two workers that
    reconciled at different moments keep the later one. Products that did not change since
    their balance are left as they are."""
    for result in proved:
        if not result.ok or result.version == result.since_version:
            continue
        await conn.execute(
            "INSERT INTO ledger_balances (product_id, version, available, held, sold, total, "
            "checked_at) VALUES (:p, :v, :a, :h, :s, :t, :now) "
            "ON CONFLICT (product_id) DO UPDATE SET version = excluded.version, "
            "available = excluded.available, held = excluded.held, sold = excluded.sold, "
            "total = excluded.total, checked_at = excluded.checked_at "
            "WHERE excluded.version >= ledger_balances.version",
            {
                "p": result.product_id,
                "v": result.version,
                "a": result.product.available,
                "h": result.product.held,
                "s": result.product.sold,
                "t": result.product.total,
                "now": now,
            },
        )


# -- history: a product's units over time, from its ledger (issue 13, item 10) -------------

# The steps a history may be drawn at (ms): the finest that gives at most `MAX_POINTS`
# points over the range asked for. A sale's first minutes are drawn per second; a day, per
# few minutes; a month, per few hours.
HISTORY_STEPS_MS = (
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    21_600_000,
    43_200_000,
    86_400_000,
)
MAX_POINTS = 600
# The longest range a history may cover (ms): 92 days, drawn a day per point at most.
MAX_HISTORY_MS = 92 * 86_400_000


def history_step(since: int, until: int) -> int:
    """The finest step (ms) of `HISTORY_STEPS_MS` that draws [since, until) in at most
    `MAX_POINTS` points."""
    span = max(until - since, 1)
    for step in HISTORY_STEPS_MS:
        if span <= step * MAX_POINTS:
            return step
    return HISTORY_STEPS_MS[-1]


@dataclass(frozen=True, slots=True)
class Point:
    """A product's units at the end of the step starting at `at` (ms) (for the last step,
    at the end of the range), and the units sold during that step."""

    at: int
    figures: Figures
    sold: int = 0


_UNITS_AT = (
    "(SELECT {column} FROM stock_ledger WHERE product_id = :p AND at < e "
    "ORDER BY at DESC, version DESC, seq DESC LIMIT 1)"
)


async def history(
    conn: Executor, product_id: int, *, since: int, until: int, step: int
) -> list[Point]:
    """The product's units per `step` ms over [since, until), from its ledger: for each
    step, the units after the last movement before its end (a step with no movement carries
    the units of the one before), and the units sold in it. Steps before the product's first
    movement (before it was made, or rows that retention removed) are left out.

    One statement whatever the history or the traffic: for each step's end, the ledger's
    last row before it, found through the index by time (`stock_ledger_by_moment`, which
    holds the whole ORDER BY: migration 0011) with one seek. Its cost is the number of
    steps (at most `MAX_POINTS`), not the rows in the range: a storm's thousands of
    movements a second, many of them in one instant, cost what a quiet hour does. Steps are
    aligned to multiples of `step` since the epoch, so that two requests agree."""
    first = since // step
    last = (until - 1) // step
    # The end of each step (the range's end for the last), and, first, the range's start:
    # the units sold in the first step are counted from there.
    ends = [since] + [min((b + 1) * step, until) for b in range(first, last + 1)]
    names = {f"e{n}": end for n, end in enumerate(ends)}
    rows = await conn.fetch_all(
        "WITH ends (e) AS (VALUES "
        + ", ".join(f"(CAST(:{name} AS BIGINT))" for name in names)
        + ") SELECT e, "
        + ", ".join(
            _UNITS_AT.format(column=column) + f" AS {column}"
            for column in ("available", "held", "sold", "total")
        )
        + " FROM ends ORDER BY e",
        {"p": product_id, **names},
    )
    found = {int(row["e"]): row for row in rows}
    points = []
    start = found.get(since)
    sold_before = 0 if start is None or start["sold"] is None else int(start["sold"])
    for b, end in zip(range(first, last + 1), ends[1:], strict=True):
        row = found.get(end)
        if row is None or row["available"] is None:
            continue  # before the product's first movement
        figures = Figures.from_row(row)
        points.append(Point(b * step, figures, sold=figures.sold - sold_before))
        sold_before = figures.sold
    return points


async def sold_out_at(conn: Executor, product_id: int) -> int | None:
    """When the product's last unit was sold (ms), if every unit is sold now: the time of
    its latest completion. Reads the ledger backwards from the newest row (its primary
    key): the rows after the last completion of a sold-out product are few (none moves
    stock but a restock, which would have un-sold it out)."""
    row = await conn.fetch_one(
        "SELECT at FROM stock_ledger WHERE product_id = :p AND movement = 'completed' "
        "ORDER BY version DESC, seq DESC LIMIT 1",
        {"p": product_id},
    )
    return None if row is None else int(row["at"])
