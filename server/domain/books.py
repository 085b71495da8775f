"""The books of one transaction: its ledger rows and outbox events, written before commit.

Every operation that moves stock does three things, always in the same transaction:

1. one UPDATE of the product row that moves `available_stock` and the counters together,
   raises `version` by one, and returns the row (`RETURNING`);
2. `books.moved(product, [Movement(...), ...])` with that row and what moved, in order
   (the holds of a batch, the expired holds of a product, a restock);
3. `await books.write(conn)` once, before the operation returns: the ledger rows and the
   outbox events, however many products and holds the transaction moved, in one statement
   on PostgreSQL (`Executor.insert_many`), with any rows the operation handed over to go
   with them (`insert_first`: a batch's new holds).

That is the whole of it: the ledger's units after each movement are worked out from the
row the UPDATE returned, so no extra read is needed, and the events (`reservation.*`,
`product.sold_out`, `product.back_in_stock`, `product.restocked`) follow from the movements.
The reconciliation (`server.domain.ledger.reconcile`) finds any operation that forgets.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.domain import ledger, outbox
from server.domain.executor import Executor, TableRows
from server.domain.ledger import DELTAS, Figures, Movement
from server.domain.model import Product


class Books:
    """Collects a transaction's ledger rows and outbox events. `now`: the transaction's
    time (ms), the `at` of every row and the `timestamp` of every event."""

    def __init__(self, *, now: int) -> None:
        self.now = now
        # The ledger's rows, as their values: an `Entry` a hold (a frozen dataclass, set
        # field by field) cost more than the tuple it was then turned into (issue 12).
        self._ledger: list[ledger.RowValues] = []
        self._events: list[tuple[int, int, int, str, str]] = []
        self._first: list[TableRows] = []

    def insert_first(self, rows: TableRows) -> None:
        """Rows of another table (`Executor.insert_many`'s part) to write with the books,
        before them, instead of in a statement of their own: one round trip fewer on
        PostgreSQL. Only rows that nothing in the transaction reads before `write`."""
        self._first.append(rows)

    def moved(self, product: Product, movements: Sequence[Movement]) -> None:
        """Record `movements`, in order, of one change of `product`, whose row is given as
        the change's UPDATE returned it (its version and units after every movement)."""
        if not movements:
            return
        after = Figures.of(product)
        # Walk back from the units after the change to those before the first movement,
        # in plain integers: a batch of holds moves once per hold (a `Figures` a step was a
        # tenth of the writer's Python for a batch).
        available, held, sold, total = after.available, after.held, after.sold, after.total
        for movement in movements:
            delta, units = DELTAS[movement.kind], movement.units
            available -= delta.available * units
            held -= delta.held * units
            sold -= delta.sold * units
            total -= delta.total * units
        before = Figures(available, held, sold, total)
        seq = 0
        for movement in movements:
            delta, units = DELTAS[movement.kind], movement.units
            available += delta.available * units
            held += delta.held * units
            sold += delta.sold * units
            total += delta.total * units
            figures = Figures(available, held, sold, total)
            reservation = movement.reservation
            self._ledger.append(
                (
                    product.id,
                    product.version,
                    seq,
                    movement.kind.value,
                    None if reservation is None else reservation.id,
                    movement.units,
                    available,
                    held,
                    sold,
                    total,
                    movement.actor,
                    self.now,
                )
            )
            event = outbox.movement_event(movement, figures)
            if event is not None:
                self._events.append((product.id, product.version, seq, *event))
            seq += 1
        event = outbox.availability_event(before, after, movements[-1].actor)
        if event is not None:
            self._events.append((product.id, product.version, seq, *event))

    async def write(self, conn: Executor) -> None:
        """Write what was recorded, and the rows handed over (`insert_first`), inside the
        transaction of the change (one statement on PostgreSQL); then forget it all."""
        parts = self._first
        if self._ledger:
            parts.append(ledger.rows_of(self._ledger))
        if self._events:
            now = self.now
            parts.append(outbox.rows_of((*e, now) for e in self._events))
        if parts:
            await conn.insert_many(parts)
        self._ledger, self._events, self._first = [], [], []
