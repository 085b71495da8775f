"""Who completes a hold: the shop's backend, with a shop API key, or the shopper.

`POST /api/reservations/{id}/complete` with `Authorization: Bearer <shop key>` is the shop's
backend, after it has taken the payment: the ledger records `shop`, and it may send
`{"orderReference": "…"}`, stored on the hold and sent in `reservation.completed`. Without a
shop key it is the shopper's own call, allowed only while `COMPLETE_BY=shopper` (the
default). A bearer token that is not meant as a shop key (a shopper's token) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from server.api.http import RequestError, parse_body
from server.domain import ledger
from server.service.shopkeys import ShopKeys
from server.wire.schemas import CompleteBody

COMPLETE_BY_SHOP = "complete_by_shop"


@dataclass(frozen=True, slots=True)
class Completion:
    actor: str
    order_reference: str | None


def shop_keys_of(request: Request) -> ShopKeys:
    found: ShopKeys = request.app.state.shop_keys
    return found


async def completion(request: Request) -> Completion:
    """Who is completing, and the order reference if the shop gave one. Raises 401 for a
    shop key that is not (or no longer) valid, 403 for a shopper when COMPLETE_BY=shop,
    400 for an order reference without a shop key or a body that is not a `CompleteBody`."""
    keys = shop_keys_of(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    by_shop = scheme.lower() == "bearer" and keys.looks_like_a_shop_key(token)
    if by_shop and not await keys.is_valid(token):
        raise RequestError(
            401, "unauthorized", "This shop API key is not valid, or it has been revoked."
        )
    reference = None
    if await request.body():
        reference = (await parse_body(request, CompleteBody)).order_reference
    if by_shop:
        return Completion(ledger.SHOP, reference)
    if request.app.state.settings.complete_by == "shop":
        raise RequestError(
            403,
            COMPLETE_BY_SHOP,
            "Purchases here are completed by the shop once it has taken the payment, not "
            "from this page.",
        )
    if reference is not None:
        raise RequestError(
            400,
            "invalid_request",
            "orderReference can only be given by the shop's backend, with a shop API key.",
        )
    return Completion(ledger.SHOPPER, None)
