"""The domain's nouns: products, holds, and the events their changes cause."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.domain.errors import DomainError, StockNow
from server.domain.executor import Row

T = TypeVar("T")


class Status(enum.StrEnum):
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class Product:
    id: int
    name: str
    price_cents: int
    total_stock: int
    available_stock: int
    version: int
    sale_starts_at: int | None
    created_at: int
    updated_at: int
    # Units held and sold (the counters of migration 0002); 0 where a view does not carry
    # them (a product rebuilt from a live-update frame).
    held_units: int = 0
    sold_units: int = 0
    # The operator's sale controls (migration 0007): when reservations were paused (None:
    # they are not), and when the sale ends (None: it does not).
    paused_at: int | None = None
    sale_ends_at: int | None = None
    # Units of this product one shopper may have in ACTIVE and COMPLETED holds together
    # (migration 0004); None: no limit.
    max_per_shopper: int | None = None
    # The waiting room (migration 0006): `off`, `fifo` or `random`, and how many shoppers
    # it admits per unit available.
    queue: str = "off"
    admit_factor: float = 1.0

    @classmethod
    def from_row(cls, row: Row) -> Product:
        starts = row["sale_starts_at"]
        limit = row["max_per_shopper"]
        return cls(
            id=int(row["id"]),
            name=str(row["name"]),
            price_cents=int(row["price_cents"]),
            total_stock=int(row["total_stock"]),
            available_stock=int(row["available_stock"]),
            version=int(row["version"]),
            sale_starts_at=None if starts is None else int(starts),
            created_at=int(row["created_at"]),
            updated_at=int(row["updated_at"]),
            held_units=int(row["held_units"]),
            sold_units=int(row["sold_units"]),
            paused_at=_optional_int(row["paused_at"]),
            sale_ends_at=_optional_int(row["sale_ends_at"]),
            max_per_shopper=None if limit is None else int(limit),
            queue=str(row["queue"]),
            admit_factor=float(row["admit_factor"]),
        )

    def sale_state(self, now: int) -> str:
        """Whether new holds may be made at `now` (ms): `scheduled` (before the start),
        `paused` (by the operator), `ended`, or `open`."""
        if self.sale_ends_at is not None and self.sale_ends_at <= now:
            return "ended"
        if self.sale_starts_at is not None and self.sale_starts_at > now:
            return "scheduled"
        if self.paused_at is not None:
            return "paused"
        return "open"

    def stock_now(self) -> StockNow:
        """Its stock, for a refusal to carry (`InsufficientStock.stock`)."""
        return StockNow(self.id, self.available_stock, self.held_units, self.version)


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    product_id: int
    quantity: int
    status: Status
    created_at: int
    expires_at: int
    completed_at: int | None
    ended_at: int | None
    # What the shop's backend called the order when it completed the hold (issue 12).
    order_reference: str | None = None
    # Who cancelled it (`shopper` or `operator`) and the operator's reason (migration 0007).
    cancelled_by: str | None = None
    cancel_reason: str | None = None
    # Whose hold it is (migration 0004): `anon:<id>` or `shop:<sub>`; None for a caller
    # that named no shopper, whose hold anyone who knows its id may act on.
    shopper_id: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> Reservation:
        completed, ended = row["completed_at"], row["ended_at"]
        reference = row["order_reference"]
        shopper = row["shopper_id"]
        return cls(
            id=str(row["id"]),
            product_id=int(row["product_id"]),
            quantity=int(row["quantity"]),
            status=Status(row["status"]),
            created_at=int(row["created_at"]),
            expires_at=int(row["expires_at"]),
            completed_at=None if completed is None else int(completed),
            ended_at=None if ended is None else int(ended),
            order_reference=None if reference is None else str(reference),
            cancelled_by=_optional_str(row["cancelled_by"]),
            cancel_reason=_optional_str(row["cancel_reason"]),
            shopper_id=None if shopper is None else str(shopper),
        )

    def visible_to(self, shopper_id: str | None) -> bool:
        """Whether a caller who is `shopper_id` (None: named no shopper) may see and act on
        this hold: a hold with a shopper is its shopper's only (issue 16); one without is
        anyone's who knows its id."""
        return self.shopper_id is None or self.shopper_id == shopper_id

    def effective_status(self, now: int) -> Status:
        """What the hold is, as of `now`: overdue is expired, whether or not a job has run."""
        if self.status is Status.ACTIVE and self.expires_at <= now:
            return Status.EXPIRED
        return self.status


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class HoldRequest:
    product_id: int
    quantity: int
    idempotency_key: str | None = None
    # Who asks, when known: the hold is theirs, counts against the product's limit per
    # shopper, and the ledger records it as `shopper:<id>`. The Idempotency-Key comes
    # already scoped to the caller (server/service/idempotency.py: `scoped_key`).
    shopper_id: str | None = None


# Events: what changed, in a form the caller publishes after commit.


@dataclass(frozen=True, slots=True)
class StockChanged:
    product: Product


@dataclass(frozen=True, slots=True)
class ProductChanged:
    """A product was created, or a field other than its available stock changed."""

    product: Product


@dataclass(frozen=True, slots=True)
class ReservationChanged:
    """A hold left ACTIVE: completed, cancelled or expired."""

    reservation: Reservation
    product: Product


Event = StockChanged | ProductChanged | ReservationChanged


@dataclass(slots=True)
class Outcome(Generic[T]):
    """What an operation did: its answer (or the domain error to raise after commit) and
    the events to publish after commit. An operation can both fail and change something:
    completing an overdue hold expires it and answers "expired"."""

    value: T | None = None
    error: DomainError | None = None
    events: list[Event] = field(default_factory=list)

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value
