"""Whether a product may have holds past their expiresAt: what a web process asks before it
refuses a reservation from the stock it knows (issue 15, promise 2).

A hold past its expiresAt gives its units back to the next reservation that needs them, in
that reservation's own transaction (`server.domain.inventory.reserve`, "lazy expiry"),
whether or not Redis, the expiry jobs or the worker are there. The fast refusal
(`server.service.shop.Shop.reserve`) answers "Sold out" without asking the database, so it
must not answer it while the units it counts as held belong to overdue holds: then the
request goes to the database, which expires them and grants it.

Cheap because of one fact: holds all last the same `HOLD_SECONDS`, so a hold made after a
moment `t` expires after every hold that was open at `t`. The earliest expiry among a
product's open holds, read once, is therefore a time before which none of its holds can
be overdue, however many holds are made meanwhile (ended holds only move it later). Until
then nothing is read; after it, one read (shared by every request that asks at once) gives
the product's current row and the new earliest expiry.

If HOLD_SECONDS is shortened while processes with the old value still run, a hold made with
the shorter time may fall due before that time: the fast refusal may then answer "Sold out"
for at most the difference, while the units stay on their way back (the next reservation
that reaches the database, the sweeper and the jobs expire the hold regardless).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.domain import inventory
from server.domain.model import Product
from server.infra.singleflight import SingleFlight
from server.storage.database import Store


@dataclass(frozen=True, slots=True)
class Look:
    """A product as the database has it now, and the earliest expiry (ms) of its open
    holds (None: it has none)."""

    product: Product | None
    earliest: int | None

    def overdue(self, now: int) -> bool:
        """Some hold of the product is past its expiresAt at `now` (ms)."""
        return self.earliest is not None and self.earliest <= now


class OverdueHolds:
    """Per product, a time (ms) before which none of its holds can be overdue."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._not_before: dict[int, int] = {}
        self._looking: SingleFlight[int, Look] = SingleFlight(self._read, name="overdue-holds")

    def may_have(self, product: Product, now: int) -> bool:
        """Whether `product` (a figure of it) may have holds past their expiresAt at `now`
        (ms): it has units held, and its earliest hold, as last read, is due by now."""
        return product.held_units > 0 and now >= self._not_before.get(product.id, 0)

    async def look(self, product_id: int) -> Look:
        """Read the product and the earliest expiry of its open holds. Requests that ask
        while a read is under way share it (a task of its own, which a request that goes
        away does not cancel). Raises what `Store.reader` raises."""
        return await self._looking(product_id)

    async def _read(self, product_id: int) -> Look:
        async with self._store.reader() as conn:
            product = await inventory.get_product(conn, product_id)
            earliest = await inventory.earliest_open_expiry(conn, product_id)
        if earliest is None:
            self._not_before.pop(product_id, None)
        else:
            self._not_before[product_id] = earliest
        return Look(product, earliest)
