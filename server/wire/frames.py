"""The live-update frames (docs/design.md §6): what a page receives over `/ws`, as data.

Their shapes are the `*Frame` models of server/wire/schemas.py (the OpenAPI document's
`x-websocket`); these functions render them from the domain's objects, and read a product
back from a `product` frame (a web process learning of another process's change).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.domain.clock import parse_iso
from server.domain.inventory import is_reservation_id
from server.domain.model import Product, ReservationChanged, Status
from server.domain.waitingroom import RoomChanged
from server.wire.schemas import product_view, reservation_view


def stock_frame(product: Product) -> dict[str, Any]:
    """A `StockFrame`: the product's available and held stock, and its version."""
    return {
        "type": "stock",
        "productId": product.id,
        "availableStock": product.available_stock,
        "heldStock": product.held_units,
        "version": product.version,
    }


def stock_from_frame(frame: Mapping[str, Any]) -> tuple[int, int, int, int | None]:
    """(product id, available, version, held or None) of a `stock_frame` from another
    process, each checked as `room_from_message` checks its numbers: an integer (not a
    string, a boolean or a fraction, which `int()` took) of 1 (the id) or 0 to MAX_NUMBER;
    `heldStock` may be missing (a process of an older release). Raises ValueError."""
    return (
        _required(frame, "productId", least=1),
        _required(frame, "availableStock"),
        _required(frame, "version"),
        _number(frame, "heldStock"),
    )


def product_frame(product: Product, *, reset: bool = False) -> dict[str, Any]:
    """A `ProductFrame`: a product created, or changed beyond its available stock; or,
    `reset`, taken back from the database at a version far below the newest told (a
    restored database, or a version far ahead from a faulty peer undone: `Catalog.reload`),
    which a page takes whatever version it holds. A process tells its own pages of its
    resets: such a frame is never published."""
    frame: dict[str, Any] = {"type": "product", "product": product_view(product)}
    if reset:
        frame["reset"] = True
    return frame


def product_from_frame(out: dict[str, Any]) -> Product:
    """The product a `product` frame describes (times it does not carry are left at 0)."""
    starts = out["saleStartsAt"]
    return Product(
        id=int(out["id"]),
        name=str(out["name"]),
        price_cents=round(float(out["price"]) * 100),
        total_stock=int(out["totalStock"]),
        available_stock=int(out["availableStock"]),
        version=int(out["version"]),
        sale_starts_at=None if starts is None else parse_iso(starts),
        created_at=0,
        updated_at=0,
        held_units=int(out.get("heldStock", 0)),
        # The frame says whether it is paused, not since when: any time will do for a view.
        paused_at=0 if out.get("paused") else None,
        sale_ends_at=None if out.get("saleEndsAt") is None else parse_iso(out["saleEndsAt"]),
        max_per_shopper=None if (limit := out.get("maxPerShopper")) is None else int(limit),
        queue=str(out.get("queue", "off")),
        admit_factor=float(out.get("admitFactor", 1.0)),
    )


def reservation_frame(event: ReservationChanged, *, now: int) -> dict[str, Any]:
    """A `ReservationFrame`: a hold that left ACTIVE, as of `now` (ms)."""
    view = reservation_view(event.reservation, product_view(event.product), now=now)
    return {"type": "reservation", "reservation": view}


def reservation_from_message(message: Mapping[str, Any]) -> str:
    """The id of the hold a `reservation` message (`reservation_frame`, from any process
    through Redis) tells of, its fields checked before any listener or page sees it, as
    pages read them: `reservation` an object whose `id` is a reservation id, `productId` an
    integer of 1 to MAX_NUMBER, `quantity` one of 1 to MAX_NUMBER, `status` one of the
    holds' statuses, and `product` an object whose `id` is that `productId` and whose
    `version` and `availableStock` are integers of 0 to MAX_NUMBER (a page applies it as the
    product's newest state). Other fields are left alone (a process of a newer release may
    send more). Raises ValueError saying which field is wrong."""
    if message.get("type") != "reservation":
        raise ValueError("not a reservation message")
    reservation = message.get("reservation")
    if not isinstance(reservation, dict):
        raise ValueError("reservation: not an object")
    reservation_id = reservation.get("id")
    if not isinstance(reservation_id, str) or not is_reservation_id(reservation_id):
        raise ValueError("reservation.id: not a reservation id")
    product_id = _required(reservation, "productId", least=1)
    _required(reservation, "quantity", least=1)
    if reservation.get("status") not in STATUSES:
        raise ValueError(f"reservation.status: not one of {', '.join(sorted(STATUSES))}")
    product = reservation.get("product")
    if not isinstance(product, dict) or product.get("id") != product_id:
        raise ValueError("reservation.product: not an object of the reservation's product")
    _required(product, "version")
    _required(product, "availableStock")
    return reservation_id


STATUSES = frozenset(status.value for status in Status)


def queue_frame(product_id: int, waiting: int, admitted: int) -> dict[str, Any]:
    """A `QueueFrame`: how many wait in a product's room, and how many hold a pass."""
    return {"type": "queue", "productId": product_id, "waiting": waiting, "admitted": admitted}


def ticket_frame(view: dict[str, Any]) -> dict[str, Any]:
    """A `TicketFrame`: the socket's shopper's ticket (`server.wire.schemas.ticket_view`)."""
    return {"type": "ticket", "ticket": view}


# The most shoppers a `room` message names; beyond, it says `everyone`.
MAX_ROOM_SHOPPERS = 2_000
# ...and the most shoppers it names as having joined (about 40 bytes each).
MAX_JOINED_SHOPPERS = 20_000
# ...and the most it names as closed `sold_out` by a step (a room that sold out: all of it).
MAX_CLOSED_SHOPPERS = 50_000
# The longest shopper id a `room` message may name: `shop:` and a token's `sub` of at most
# 200 characters (server/api/identity.py `MAX_SUB_LENGTH`), or `anon:` and a random id.
MAX_SHOPPER_ID_CHARS = 256
# Counts, steps and times (ms) are BIGINT columns: at most this.
MAX_NUMBER = 2**63 - 1


def room_message(news: RoomChanged) -> dict[str, Any]:
    """What the web processes tell each other of a room (`RoomChanged`): never sent to a
    page as it is (it names shoppers); each hub turns it into `queue` and `ticket` frames."""
    # Joins are named however many (up to `MAX_JOINED_SHOPPERS`): a hub checks each name
    # against its own pages in a µs, while `everyone` makes it read the whole room again and
    # consider every page in it (news of 2,000 joins at a sale's first second once did).
    # The same for those a step closed: each hub tells their pages `sold_out` from the names
    # alone, where `everyone` had every web process read the room whole (15,000 tickets).
    everyone = (
        news.everyone
        or len(news.shoppers) > MAX_ROOM_SHOPPERS
        or len(news.joined) > MAX_JOINED_SHOPPERS
        or len(news.closed) > MAX_CLOSED_SHOPPERS
        or len(news.passed) > MAX_CLOSED_SHOPPERS
    )
    return {
        "type": "room",
        "productId": news.product_id,
        "waiting": news.waiting,
        "admitted": news.admitted,
        "shoppers": [] if everyone else sorted(news.shoppers),
        "everyone": everyone,
        "joined": [] if everyone else sorted(news.joined - news.shoppers),
        "closed": [] if everyone else sorted(news.closed),
        "closedAt": None if everyone else news.closed_at,
        "passed": [] if everyone else sorted(news.passed),
        "passedAt": None if everyone else news.passed_at,
        "passUntil": None if everyone else news.pass_until,
        "step": news.step,
    }


def room_from_message(message: Mapping[str, Any]) -> RoomChanged:
    """The `RoomChanged` a `room` message (`room_message`, from any web process through
    Redis) tells, every field checked before anything is made of it: `productId` an
    integer of 1 to MAX_NUMBER; `waiting` and `admitted`, `passedAt` and `passUntil`,
    each pair both null or both integers of 0 to MAX_NUMBER, as `closedAt` and `step`;
    `everyone` true or false; `shoppers`, `joined`, `closed` and `passed` lists of at
    most as many shopper ids as `room_message` names (each a string of 1 to
    MAX_SHOPPER_ID_CHARS characters). A field that is missing counts as null (or empty,
    or false): a process of an older release sends fewer; one it does not know is left
    alone, for the same reason. Raises ValueError saying which field is wrong."""
    if message.get("type") != "room":
        raise ValueError("not a room message")
    product_id = _required(message, "productId", least=1)
    waiting, admitted = _number(message, "waiting"), _number(message, "admitted")
    if (waiting is None) != (admitted is None):
        raise ValueError("waiting and admitted: both null or both counts")
    passed_at, pass_until = _number(message, "passedAt"), _number(message, "passUntil")
    if (passed_at is None) != (pass_until is None):
        raise ValueError("passedAt and passUntil: both null or both times")
    everyone = message.get("everyone", False)
    if not isinstance(everyone, bool):
        raise ValueError("everyone: not true or false")
    return RoomChanged(
        product_id,
        waiting,
        admitted,
        shoppers=_names(message, "shoppers", MAX_ROOM_SHOPPERS),
        everyone=everyone,
        joined=_names(message, "joined", MAX_JOINED_SHOPPERS),
        closed=_names(message, "closed", MAX_CLOSED_SHOPPERS),
        closed_at=_number(message, "closedAt"),
        passed=_names(message, "passed", MAX_CLOSED_SHOPPERS),
        passed_at=passed_at,
        pass_until=pass_until,
        step=_number(message, "step"),
    )


def _number(message: Mapping[str, Any], field: str, *, least: int = 0) -> int | None:
    """`field` of `message`: None if missing or null, else `_required`'s integer."""
    if message.get(field) is None:
        return None
    return _required(message, field, least=least)


def _required(message: Mapping[str, Any], field: str, *, least: int = 0) -> int:
    """`field` of `message`, an integer of `least` to MAX_NUMBER; else ValueError."""
    value = message.get(field)
    # bool is an int in Python, and JSON's true is no count.
    if type(value) is not int or not least <= value <= MAX_NUMBER:
        raise ValueError(f"{field}: not an integer of {least} to {MAX_NUMBER}")
    return value


def _names(message: Mapping[str, Any], field: str, most: int) -> frozenset[str]:
    value = message.get(field)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"{field}: not a list of at most {most} shopper ids")
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_SHOPPER_ID_CHARS for n in value):
        raise ValueError(f"{field}: a name that is not a shopper id")
    return frozenset(value)
