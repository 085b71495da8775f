"""The transactional outbox: the events other systems must get, written in the same
transaction as the change that caused them (by `server.domain.books.Books`), so that no
commit can happen without its events and no event without its commit. The worker delivers
them as webhooks (`server.service.webhooks`).

An event's body is rendered here, once, when it is written: every attempt and every
endpoint gets the same bytes, and its `id` (the `webhook-id`) stays the same across
retries. The shape follows the Standard Webhooks recommendation:
`{"type": "reservation.completed", "timestamp": "…Z", "data": {…}}`; README.md
("Integrating with the shop's systems") documents every type.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.domain.clock import iso
from server.domain.executor import Executor
from server.domain.ledger import Figures, Kind, Movement
from server.domain.model import Product, Reservation

RESERVATION_CREATED = "reservation.created"
RESERVATION_COMPLETED = "reservation.completed"
RESERVATION_CANCELLED = "reservation.cancelled"
RESERVATION_EXPIRED = "reservation.expired"
PRODUCT_SOLD_OUT = "product.sold_out"
PRODUCT_BACK_IN_STOCK = "product.back_in_stock"
PRODUCT_RESTOCKED = "product.restocked"
PRODUCT_STOCK_REDUCED = "product.stock_reduced"
PRODUCT_UPDATED = "product.updated"

EVENT_TYPES = (
    RESERVATION_CREATED,
    RESERVATION_COMPLETED,
    RESERVATION_CANCELLED,
    RESERVATION_EXPIRED,
    PRODUCT_SOLD_OUT,
    PRODUCT_BACK_IN_STOCK,
    PRODUCT_RESTOCKED,
    PRODUCT_STOCK_REDUCED,
    PRODUCT_UPDATED,
)

# The event a movement of a hold causes.
RESERVATION_EVENTS = {
    Kind.HELD: RESERVATION_CREATED,
    Kind.COMPLETED: RESERVATION_COMPLETED,
    Kind.CANCELLED: RESERVATION_CANCELLED,
    Kind.EXPIRED: RESERVATION_EXPIRED,
}


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event to deliver: `id` is its webhook-id; ordered per product by (version, seq)."""

    id: str
    product_id: int
    version: int
    seq: int
    type: str
    payload: str
    created_at: int


def new_event_ids(count: int) -> list[str]:
    """`msg_` and 128 random bits each (one read of the OS's randomness for all)."""
    entropy = secrets.token_bytes(16 * count)
    return [
        "msg_" + base64.b32encode(entropy[i : i + 16]).decode().rstrip("=").lower()
        for i in range(0, 16 * count, 16)
    ]


def stock_data(product_id: int, version: int, seq: int, figures: Figures) -> dict[str, Any]:
    """The product's units right after the event; (`version`, `sequence`) orders a
    product's events."""
    return {
        "productId": product_id,
        "availableStock": figures.available,
        "heldUnits": figures.held,
        "soldUnits": figures.sold,
        "totalStock": figures.total,
        "version": version,
        "sequence": seq,
    }


def reservation_data(reservation: Reservation) -> dict[str, Any]:
    completed = reservation.completed_at
    return {
        "id": reservation.id,
        "productId": reservation.product_id,
        "quantity": reservation.quantity,
        "status": reservation.status.value,
        "createdAt": iso(reservation.created_at),
        "expiresAt": iso(reservation.expires_at),
        "completedAt": None if completed is None else iso(completed),
        "orderReference": reservation.order_reference,
        "cancelledBy": reservation.cancelled_by,
        "cancelReason": reservation.cancel_reason,
    }


def body(event_type: str, at: int, data: dict[str, Any]) -> str:
    """The event's JSON text, exactly as it is sent and signed."""
    return json.dumps(
        {"type": event_type, "timestamp": iso(at), "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def movement_event(
    movement: Movement, product_id: int, version: int, seq: int, figures: Figures, at: int
) -> tuple[str, str] | None:
    """The event (type, body) a movement causes by itself, if any."""
    stock = stock_data(product_id, version, seq, figures)
    if movement.reservation is not None and movement.kind in RESERVATION_EVENTS:
        kind = RESERVATION_EVENTS[movement.kind]
        data: dict[str, Any] = {
            "reservation": reservation_data(movement.reservation),
            "stock": stock,
            "actor": movement.actor,
        }
        return kind, body(kind, at, data)
    if movement.kind in (Kind.RESTOCKED, Kind.REDUCED):
        kind = PRODUCT_RESTOCKED if movement.kind is Kind.RESTOCKED else PRODUCT_STOCK_REDUCED
        data = {"units": movement.units, "stock": stock, "actor": movement.actor}
        return kind, body(kind, at, data)
    return None


def availability_event(
    before: Figures, after: Figures, product_id: int, version: int, seq: int, actor: str, at: int
) -> tuple[str, str] | None:
    """`product.sold_out` when a change took the last units, `product.back_in_stock` when
    one brought units back to a sold-out product (not at its creation)."""
    if before.available > 0 and after.available == 0:
        kind = PRODUCT_SOLD_OUT
    elif before.available == 0 and after.available > 0 and before.total > 0:
        kind = PRODUCT_BACK_IN_STOCK
    else:
        return None
    data = {"stock": stock_data(product_id, version, seq, after), "actor": actor}
    return kind, body(kind, at, data)


def product_updated(product: Product, changed: Sequence[str], actor: str, at: int) -> OutboxEvent:
    """`product.updated`: the operator changed the product beyond its stock (name, price,
    schedule, paused), at the product's new version (seq 0: no movement shares it).
    `changed`: the fields that were sent, as the API names them."""
    starts, ends = product.sale_starts_at, product.sale_ends_at
    data = {
        "product": {
            "productId": product.id,
            "name": product.name,
            "price": product.price_cents / 100,
            "saleStartsAt": None if starts is None else iso(starts),
            "saleEndsAt": None if ends is None else iso(ends),
            "paused": product.paused_at is not None,
            "version": product.version,
        },
        "changed": list(changed),
        "actor": actor,
    }
    (event_id,) = new_event_ids(1)
    return OutboxEvent(
        event_id,
        product.id,
        product.version,
        0,
        PRODUCT_UPDATED,
        body(PRODUCT_UPDATED, at, data),
        at,
    )


COLUMNS = "id, product_id, version, seq, type, payload, created_at"
INSERT_CHUNK = 1000


async def insert(conn: Executor, events: Sequence[OutboxEvent]) -> None:
    """Write `events` with one multi-row INSERT (per `INSERT_CHUNK` rows)."""
    for start in range(0, len(events), INSERT_CHUNK):
        chunk = events[start : start + INSERT_CHUNK]
        rows = []
        values: dict[str, object] = {}
        for n, e in enumerate(chunk):
            rows.append(f"(:i{n}, :p{n}, :v{n}, :s{n}, :k{n}, :b{n}, :c{n})")
            values.update(
                {
                    f"i{n}": e.id,
                    f"p{n}": e.product_id,
                    f"v{n}": e.version,
                    f"s{n}": e.seq,
                    f"k{n}": e.type,
                    f"b{n}": e.payload,
                    f"c{n}": e.created_at,
                }
            )
        await conn.execute(f"INSERT INTO outbox ({COLUMNS}) VALUES {', '.join(rows)}", values)
