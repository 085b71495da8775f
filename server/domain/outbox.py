"""The transactional outbox: the events other systems must get, written in the same
transaction as the change that caused them (by `server.domain.books.Books`), so that no
commit can happen without its events and no event without its commit. The worker delivers
them as webhooks (`server.service.webhooks`).

What the transaction writes is the least the body needs (`stored`): a JSON array of the
hold's and the stock's figures, in the order `render` reads them for the event's type, with
no keys, no nesting and no formatted times; the row's own columns (type, product, version,
sequence, time) say the rest. A reservation event stores only what its movement's ledger row
(written in the same statement, at the same key) does not hold: the hold's id, units, the
figures and the actor are read from that row at delivery (`LEDGER_JOIN`; ledger rows are
never changed, and retention keeps one while its event is kept), which cut the WAL that
every hold's commit must flush on PostgreSQL (docs/bench/journal.md: what the books cost).
The body is rendered at delivery (`render`, in the worker, outside any transaction): the
same bytes every time, so every attempt and every endpoint gets the same body, and its
webhook-id (`event_id`, derived from the row's key: product, version, sequence) stays the
same across retries.
A row whose payload is a JSON object is its body already (`product.updated`, which no
reservation writes, and every row written before migration 0010's release). The shape follows
the Standard Webhooks recommendation:
`{"type": "reservation.completed", "timestamp": "…Z", "data": {…}}`; README.md
("Integrating with the shop's systems") documents every type.

Rendering the body in the reservation's transaction cost the single SQLite writer more than
the rest of the books together (docs/bench/journal.md: what the books cost).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from server.domain import jsontext
from server.domain.clock import iso
from server.domain.executor import Columns, Executor, Row, TableRows
from server.domain.ledger import Figures, Kind, Movement
from server.domain.model import Product

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
    """An event to deliver, keyed and ordered per product by (version, seq); its webhook-id
    is derived from that key (`event_id`)."""

    product_id: int
    version: int
    seq: int
    type: str
    payload: str
    created_at: int


# Each byte → one of the 32 characters of base32's lowercase alphabet (256 is a multiple of
# 32, so each character is equally likely from a uniform byte).
_BASE32 = bytes(b"abcdefghijklmnopqrstuvwxyz234567"[b % 32] for b in range(256))
ID_CHARS = 26


def event_id(key: bytes, product_id: int, version: int, seq: int, created_at: int) -> str:
    """The webhook-id of the event (`product_id`, `version`, `seq`) made at `created_at`
    (ms): `msg_` and 26 base32 characters (the API's `^msg_[a-z2-7]{26}$`, 130 bits) of a
    keyed BLAKE2b of those. The same for every attempt and every endpoint, as the Standard
    Webhooks specification asks (all four are stored with the event), and computed, not
    stored: a random id stored with each event was its own b-tree in every reservation's
    transaction. `key`: the database's own (`webhooks.id_key`, at most 64 bytes), so that
    another database's events, which reuse the same (product, version, seq), never share
    an id with this one's. `created_at`: because a copy of the database has the key too: a
    backup restored (or a staging copy) makes its next events with the (product, version,
    seq) of events receivers already have, and receivers drop an event whose id they saw."""
    digest = hashlib.blake2b(
        f"{product_id}:{version}:{seq}:{created_at}".encode(), key=key, digest_size=ID_CHARS
    ).digest()
    return "msg_" + digest.translate(_BASE32).decode()


def stored_event_id(key: bytes, row: Row) -> str:
    """The webhook-id of a stored outbox row (with `id`, `product_id`, `version`, `seq` and
    `created_at`): its own random `id` if it was written before migration 0014, else
    `event_id` of its key and creation time."""
    if row["id"] is not None:
        return str(row["id"])
    return event_id(
        key, int(row["product_id"]), int(row["version"]), int(row["seq"]), int(row["created_at"])
    )


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


def body(event_type: str, at: int, data: dict[str, Any]) -> str:
    """The event's JSON text, exactly as it is sent and signed."""
    return json.dumps(
        {"type": event_type, "timestamp": iso(at), "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def movement_event(movement: Movement, figures: Figures) -> tuple[str, str] | None:
    """The event a movement causes by itself, if any: (type, stored form)."""
    f = figures
    reservation = movement.reservation
    if reservation is not None and movement.kind in RESERVATION_EVENTS:
        # Only what the movement's ledger row (same product, version and sequence, written
        # in the same statement) does not hold: the hold's id, its units, the figures and
        # the actor are read from that row at delivery (`render`'s `ledger`).
        return RESERVATION_EVENTS[movement.kind], jsontext.compact(
            [
                reservation.status.value,
                reservation.created_at,
                reservation.expires_at,
                reservation.completed_at,
                reservation.order_reference,
                reservation.cancelled_by,
                reservation.cancel_reason,
            ]
        )
    if movement.kind in (Kind.RESTOCKED, Kind.REDUCED):
        kind = PRODUCT_RESTOCKED if movement.kind is Kind.RESTOCKED else PRODUCT_STOCK_REDUCED
        return kind, jsontext.compact(
            [movement.units, f.available, f.held, f.sold, f.total, movement.actor]
        )
    return None


def availability_event(before: Figures, after: Figures, actor: str) -> tuple[str, str] | None:
    """`product.sold_out` when a change took the last units, `product.back_in_stock` when
    one brought units back to a sold-out product (not at its creation): (type, stored
    form)."""
    if before.available > 0 and after.available == 0:
        kind = PRODUCT_SOLD_OUT
    elif before.available == 0 and after.available > 0 and before.total > 0:
        kind = PRODUCT_BACK_IN_STOCK
    else:
        return None
    return kind, jsontext.compact([after.available, after.held, after.sold, after.total, actor])


# What a reservation event's body takes from its movement's ledger row (the ledger row of
# the same product, version and sequence): the hold's id, its units, the product's
# available, held, sold and total units after the movement, and the actor. Ledger rows are
# never changed, so the body rendered at any delivery is the one of the commit.
LedgerPart = tuple[str, int, int, int, int, int, str]

# The ledger's columns a delivery reads with its outbox row (`ledger_part`), from
# `LEDGER_JOIN`'s `l`.
LEDGER_COLUMNS = (
    "l.reservation_id AS l_reservation_id, l.units AS l_units, l.available AS l_available, "
    "l.held AS l_held, l.sold AS l_sold, l.total AS l_total, l.actor AS l_actor"
)
# The ledger row of the outbox row `o` (LEFT: product events have none).
LEDGER_JOIN = (
    "LEFT JOIN stock_ledger l ON l.product_id = o.product_id AND l.version = o.version "
    "AND l.seq = o.seq"
)


def ledger_part(row: Row) -> LedgerPart | None:
    """`LedgerPart` of a row read with `LEDGER_COLUMNS`; None if it has no ledger row."""
    if row["l_reservation_id"] is None:
        return None
    return (
        str(row["l_reservation_id"]),
        int(row["l_units"]),
        int(row["l_available"]),
        int(row["l_held"]),
        int(row["l_sold"]),
        int(row["l_total"]),
        str(row["l_actor"]),
    )


# An outbox row's columns as `StoredEvent.from_row` reads them, with `LEDGER_COLUMNS` (from
# `outbox o` and `LEDGER_JOIN`): the one list every reader of events uses (a delivery's,
# `webhooks.OUTGOING`).
STORED_COLUMNS = (
    "o.type, o.payload, o.product_id, o.version, o.seq, o.created_at, " + LEDGER_COLUMNS
)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An outbox row as stored (`stored`: its compact form, or a JSON object), its key
    (product, version, sequence), `created_at` (the event's time, ms) and its movement's
    ledger row (`LedgerPart`, for a reservation event): what its body is rendered from, at
    every delivery and wherever else it is shown (`body`)."""

    type: str
    stored: str
    product_id: int
    version: int
    seq: int
    created_at: int
    ledger: LedgerPart | None = None

    @classmethod
    def from_row(cls, row: Row) -> StoredEvent:
        """Of a row read with `type`, `payload`, `product_id`, `version`, `seq`,
        `created_at` (`STORED_COLUMNS`) and `LEDGER_COLUMNS`."""
        return cls(
            type=str(row["type"]),
            stored=str(row["payload"]),
            product_id=int(row["product_id"]),
            version=int(row["version"]),
            seq=int(row["seq"]),
            created_at=int(row["created_at"]),
            ledger=ledger_part(row),
        )

    def body(self) -> str:
        """The body sent and signed (`render`): the same text every time. Raises
        ValueError as `render` does."""
        return render(
            self.type,
            self.stored,
            self.product_id,
            self.version,
            self.seq,
            self.created_at,
            self.ledger,
        )


def render(
    event_type: str,
    stored: str,
    product_id: int,
    version: int,
    seq: int,
    created_at: int,
    ledger: LedgerPart | None = None,
) -> str:
    """The body of an outbox row, exactly as it is sent and signed: from its stored form,
    its columns (type, product, version, sequence, `created_at`: the event's time, ms) and,
    for a reservation event, its movement's ledger row (`ledger`, `LedgerPart`: read with
    `LEDGER_COLUMNS`). A stored JSON object is the body already. Raises ValueError for a
    stored form that is neither (no code writes one), or a reservation event whose ledger
    row is not given (retention keeps a ledger row while its outbox row is there)."""
    if stored.startswith("{"):
        return stored
    fields = json.loads(stored)
    if event_type in _RESERVATION_TYPES:
        if len(fields) == _RESERVATION_OWN_FIELDS:
            if ledger is None:
                raise ValueError(
                    f"the {event_type} event of product {product_id} at ({version}, {seq}) "
                    "has no ledger row"
                )
            rid, quantity, *figures, actor = ledger
            status, created, expires, completed, ref, by, reason = fields
        else:  # written whole: a row from before reservation events left their share to the ledger
            (rid, quantity, status, created, expires, completed, ref, by, reason, *rest) = fields
            *figures, actor = rest
        data: dict[str, Any] = {
            "reservation": {
                "id": rid,
                "productId": product_id,
                "quantity": quantity,
                "status": status,
                "createdAt": iso(created),
                "expiresAt": iso(expires),
                "completedAt": None if completed is None else iso(completed),
                "orderReference": ref,
                "cancelledBy": by,
                "cancelReason": reason,
            },
            "stock": stock_data(product_id, version, seq, Figures(*figures)),
            "actor": actor,
        }
    elif event_type in (PRODUCT_RESTOCKED, PRODUCT_STOCK_REDUCED):
        units, *figures, actor = fields
        stock = stock_data(product_id, version, seq, Figures(*figures))
        data = {"units": units, "stock": stock, "actor": actor}
    elif event_type in (PRODUCT_SOLD_OUT, PRODUCT_BACK_IN_STOCK):
        *figures, actor = fields
        data = {"stock": stock_data(product_id, version, seq, Figures(*figures)), "actor": actor}
    else:
        raise ValueError(f"an outbox row of type {event_type!r} holds no body")
    return body(event_type, created_at, data)


_RESERVATION_TYPES = frozenset(RESERVATION_EVENTS.values())
# How many fields a reservation event's stored form has when the rest is its ledger row's.
_RESERVATION_OWN_FIELDS = 7


def product_updated(product: Product, changed: Sequence[str], actor: str, at: int) -> OutboxEvent:
    """`product.updated`: the operator changed the product beyond its stock (name, price,
    schedule, paused, the limit per shopper, the waiting room), at the product's new
    version (seq 0: no movement shares it).
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
            "maxPerShopper": product.max_per_shopper,
            "queue": product.queue,
            "admitFactor": product.admit_factor,
            "version": product.version,
        },
        "changed": list(changed),
        "actor": actor,
    }
    return OutboxEvent(
        product.id,
        product.version,
        0,
        PRODUCT_UPDATED,
        body(PRODUCT_UPDATED, at, data),
        at,
    )


_TYPED: Columns = (
    ("product_id", "INTEGER"),
    ("version", "BIGINT"),
    ("seq", "INTEGER"),
    ("type", "TEXT"),
    ("payload", "TEXT"),
    ("created_at", "BIGINT"),
)


async def insert(conn: Executor, events: Sequence[OutboxEvent]) -> None:
    """Write `events` (`Executor.insert_rows`)."""
    await conn.insert_rows(*rows(events))


def rows(events: Sequence[OutboxEvent]) -> TableRows:
    """`events` as the outbox's rows, for `Executor.insert_rows` or `insert_many`."""
    return rows_of(
        (e.product_id, e.version, e.seq, e.type, e.payload, e.created_at) for e in events
    )


def rows_of(values: Iterable[tuple[int, int, int, str, str, int]]) -> TableRows:
    """The outbox's rows from their values: (product_id, version, seq, type, payload,
    created_at), each as `OutboxEvent` has it."""
    return "outbox", _TYPED, list(values)
