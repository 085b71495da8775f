"""The live-update frames (docs/design.md §6): what a page receives over `/ws`, as data.

Their shapes are the `*Frame` models of server/wire/schemas.py (the OpenAPI document's
`x-websocket`); these functions render them from the domain's objects, and read a product
back from a `product` frame (a web process learning of another process's change).
"""

from __future__ import annotations

from typing import Any

from server.domain.clock import parse_iso
from server.domain.model import Product, ReservationChanged
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


def product_frame(product: Product) -> dict[str, Any]:
    """A `ProductFrame`: a product created, or changed beyond its available stock."""
    return {"type": "product", "product": product_view(product)}


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
    )


def reservation_frame(event: ReservationChanged, *, now: int) -> dict[str, Any]:
    """A `ReservationFrame`: a hold that left ACTIVE, as of `now` (ms)."""
    view = reservation_view(event.reservation, product_view(event.product), now=now)
    return {"type": "reservation", "reservation": view}
