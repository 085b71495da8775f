"""What can go wrong, as the domain sees it: what the shopper or operator asked for is
refused by the rules or by the stock. The HTTP layer maps each class to a status
(server/api/http.py).

Every error has a stable `code` for programs and a `message` that is one human sentence.
Malformed requests (`server.api.http.RequestError`) and infrastructure that fails
(`server.storage.errors`) are not domain errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.domain.clock import iso


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        """Fields the error's JSON body carries besides `statusCode`, `error`, `code` and
        `message` (see `server.wire.schemas.ErrorOut`); none by default."""
        return {}


@dataclass(frozen=True, slots=True)
class StockNow:
    """A product's stock as it stood when a request was refused: `available_stock` units
    on sale and `held_units` in holds (which may come back), at `version` (the product's
    version, as in a `stock` frame)."""

    product_id: int
    available_stock: int
    held_units: int
    version: int


def named(value: int | str) -> str:
    """An id as a message names it: a number as it is, anything else in quotes (the API
    layer passes what the caller sent, already cut short and escaped: `GET /api/products/abc`
    is answered "There is no product "abc".")."""
    return str(value) if isinstance(value, int) else f'"{value}"'


class ProductNotFound(DomainError):
    """No product has this id. `product_id`: the id, or the text the caller sent where an id
    was expected (`GET /api/products/abc`), which the message names as sent."""

    code = "product_not_found"

    def __init__(self, product_id: int | str) -> None:
        super().__init__(f"There is no product {named(product_id)}.")
        self.product_id = product_id


class ReservationNotFound(DomainError):
    """No reservation has this id (or the text sent is not a reservation id at all)."""

    code = "reservation_not_found"

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"There is no reservation {named(reservation_id)}.")
        self.reservation_id = reservation_id


class InsufficientStock(DomainError):
    """Fewer units left than requested. `available` is what the message says is left for
    this request; `stock`, when known, is the product's stock at that moment, which the
    409 body carries so that a page shows it at once (a polling page would otherwise show
    the old figure for seconds)."""

    code = "insufficient_stock"

    def __init__(self, available: int, requested: int, stock: StockNow | None = None) -> None:
        held = 0 if stock is None else stock.held_units
        if available <= 0 and held > 0:
            # Not sold out yet: units come back when holds end unbought.
            units = "1 unit is" if held == 1 else f"{held} units are"
            message = f"All reserved: {units} held and may come back."
        elif available <= 0:
            message = "Sold out: no units are left."
        elif available == 1:
            message = f"Only 1 left, {requested} requested."
        else:
            message = f"Only {available} left, {requested} requested."
        super().__init__(message)
        self.available = available
        self.requested = requested
        self.stock = stock

    def body(self) -> dict[str, Any]:
        if self.stock is None:
            return {}
        return {
            "stock": {
                "productId": self.stock.product_id,
                "availableStock": self.stock.available_stock,
                "heldStock": self.stock.held_units,
                "version": self.stock.version,
            }
        }


class ShopperLimitReached(DomainError):
    """The shopper would have more units of the product in ACTIVE and COMPLETED holds than
    its `maxPerShopper` (`limit`); `held` is how many they have now (issue 16)."""

    code = "shopper_limit_reached"

    def __init__(self, limit: int, held: int) -> None:
        super().__init__(f"You can hold at most {limit} of these; you have {held}.")
        self.limit = limit
        self.held = held

    def body(self) -> dict[str, Any]:
        return {"limit": self.limit, "held": self.held}


class SaleNotStarted(DomainError):
    code = "sale_not_started"

    def __init__(self, starts_at_ms: int) -> None:
        super().__init__(f"The sale has not started yet; it starts at {iso(starts_at_ms)}.")
        self.starts_at_ms = starts_at_ms


class SalePaused(DomainError):
    """The operator paused reservations of this product (holds already made can still be
    bought)."""

    code = "sale_paused"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"Reservations for {name} are paused by the shop for now; try again in a little while."
        )


class SaleEnded(DomainError):
    code = "sale_ended"

    def __init__(self, name: str, ended_at_ms: int) -> None:
        super().__init__(f"The sale of {name} ended at {iso(ended_at_ms)}.")
        self.ended_at_ms = ended_at_ms


class StockCommitted(DomainError):
    """An operator asked to take away more units than are neither held nor sold: a
    product's stock never goes below its held and sold units (issue 13, item 11).
    `stock`: the product's stock as it stood, carried by the 409 body."""

    code = "stock_committed"

    def __init__(self, requested: int, stock: StockNow, sold: int) -> None:
        available = stock.available_stock
        units = "1 unit" if available == 1 else f"{available} units"
        super().__init__(
            f"Only {units} can be taken away, {requested} asked: the stock cannot go below the "
            f"{stock.held_units} held and {sold} sold."
        )
        self.requested = requested
        self.stock = stock

    def body(self) -> dict[str, Any]:
        return {
            "stock": {
                "productId": self.stock.product_id,
                "availableStock": self.stock.available_stock,
                "heldStock": self.stock.held_units,
                "version": self.stock.version,
            }
        }


class InvalidSchedule(DomainError):
    code = "invalid_schedule"

    def __init__(self, starts_at_ms: int, ends_at_ms: int) -> None:
        super().__init__(
            f"The sale would end ({iso(ends_at_ms)}) before it starts ({iso(starts_at_ms)})."
        )


class ReservationExpired(DomainError):
    code = "reservation_expired"

    def __init__(self) -> None:
        super().__init__("This reservation has expired; its units went back on sale.")


class ReservationCancelled(DomainError):
    code = "reservation_cancelled"

    def __init__(self) -> None:
        super().__init__("This reservation was cancelled.")


class ReservationCompleted(DomainError):
    code = "reservation_completed"

    def __init__(self) -> None:
        super().__init__("This reservation was already purchased and cannot be cancelled.")


class IdempotencyKeyReused(DomainError):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used for a different request; use a new key."
        )


# -- the waiting room (issue 17) ------------------------------------------------------------


class QueueOff(DomainError):
    """The product has no waiting room (`queue` is `off`): reserve directly."""

    code = "queue_off"

    def __init__(self, product_id: int) -> None:
        super().__init__(f"Product {product_id} has no waiting room; reserve it directly.")
        self.product_id = product_id


class QueueNotOpen(DomainError):
    """The room opens `QUEUE_OPENS_SECONDS` before the sale starts; not yet."""

    code = "queue_not_open"

    def __init__(self, opens_at_ms: int) -> None:
        super().__init__(f"The waiting room is not open yet; it opens at {iso(opens_at_ms)}.")
        self.opens_at_ms = opens_at_ms

    def body(self) -> dict[str, Any]:
        return {"opensAt": iso(self.opens_at_ms)}


class QueueInUse(DomainError):
    """The operator switched a room between `fifo` and `random` (or turned one on again
    before the last tickets of its switch to `off` were closed, or gave a `random` room
    without a start one in the future: `postponed`, the same switch from arrival order to
    drawn places) while shoppers are in it:
    their places were decided at their joins under the old order, so the switch waits
    until nobody waits or holds a pass (`off` first closes every ticket)."""

    code = "queue_in_use"

    def __init__(
        self, queue: str, wanted: str, open_tickets: int, *, postponed: bool = False
    ) -> None:
        people = "1 shopper is" if open_tickets == 1 else f"{open_tickets} shoppers are"
        switch = (
            "cannot be given a start in the future (its joins would be drawn, ahead of "
            "those in line by arrival)"
            if postponed
            else f"cannot switch from {queue} to {wanted}"
        )
        super().__init__(
            f"The waiting room {switch} while {people} in it: their places were given in "
            "the old order. Switch it off first (every ticket ends), or wait until the line "
            "is empty."
        )


class NoTicket(DomainError):
    """The caller has no ticket for this product's waiting room (or names no shopper)."""

    code = "no_ticket"

    def __init__(self, product_id: int) -> None:
        super().__init__(f"You have no place in the waiting room of product {product_id}.")
        self.product_id = product_id


class NotAdmitted(DomainError):
    """A reservation of a product whose waiting room is active, by a shopper without a
    valid pass. `position`: the shopper's place in line (1 = next), None when they have no
    ticket, or it has ended, or the random draw has not been made yet. `units`: the request
    asked for more than a pass allows (`maxPerShopper`, or 1 without one); the pass, if
    any, is kept."""

    code = "not_admitted"

    def __init__(
        self, position: int | None, state: str | None = None, *, units: int | None = None
    ) -> None:
        if units is not None:
            text = (
                f"Your turn in the waiting room is for at most {units} "
                f"unit{'' if units == 1 else 's'}: ask for fewer."
            )
        elif position is not None:
            text = f"It is not your turn yet: you are number {position} in the waiting room."
        elif state == "waiting":
            text = "It is not your turn yet: your place in the waiting room is drawn at the start."
        elif state is None:
            text = "This product has a waiting room: join it, and reserve when it is your turn."
        else:
            text = f"You cannot reserve this product now: your ticket is {state.replace('_', ' ')}."
        super().__init__(text)
        self.position = position
        self.units = units
        self.state = state

    def body(self) -> dict[str, Any]:
        return {"position": self.position}
