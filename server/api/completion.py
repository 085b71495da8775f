"""Who completes a hold: the shop's backend, with a shop API key, or the shopper.

`POST /api/reservations/{id}/complete` with `Authorization: Bearer <shop key>` is the shop's
backend, after it has taken the payment: the ledger records `shop`, and it may send
`{"orderReference": "…"}`, stored on the hold and sent in `reservation.completed`. Without a
shop key it is the shopper's own call, allowed only while `COMPLETE_BY=shopper` (the
default). A bearer token that is not meant as a shop key (a shopper's token) is left alone.

Wrong keys are throttled per client address (`FailureThrottle`, `ADMIN_SIGN_IN_LIMIT`, as
for operator tokens): a bearer token that is neither a valid shop key nor a valid shopper
token costs the client a try (a wrong guess at a key from SHOP_API_KEYS looks like a
shopper's token); with none left, every completion with a bearer token from that client is
429 `too_many_failed_sign_ins` with `Retry-After`, before the key is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from server.api.http import RequestError, parse_body
from server.api.identity import shopper_of
from server.api.ratelimit import FailureThrottle, refuse_if_out_of_tries
from server.domain import ledger
from server.infra.clients import client_key
from server.infra.metrics import SHOP_KEY_THROTTLED
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
    """Who is completing, and the order reference if the shop gave one. Raises 429 for a
    client out of tries (wrong keys, above), 401 for a shop key that is not (or no longer)
    valid or a bearer token that is neither a shop key nor a valid shopper token, 403 for a
    shopper when COMPLETE_BY=shop, 400 for an order reference without a shop key or a body
    that is not a `CompleteBody`."""
    keys = shop_keys_of(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    bearer = scheme.lower() == "bearer"
    by_shop = bearer and keys.looks_like_a_shop_key(token)
    if bearer:
        throttle: FailureThrottle = request.app.state.shop_key_throttle
        client = client_key(request.scope)
        refuse_if_out_of_tries(
            throttle, client, wrong="shop API keys or tokens", refusals=SHOP_KEY_THROTTLED
        )
        if by_shop and not await keys.is_valid(token):
            throttle.failed(client)
            raise RequestError(
                401, "unauthorized", "This shop API key is not valid, or it has been revoked."
            )
        if not by_shop:
            try:  # a shopper's token, or a wrong guess at a key from SHOP_API_KEYS
                shopper_of(request)
            except RequestError as refused:
                throttle.failed(client)
                if refused.status != 401:
                    raise
                # Say both readings: a shop's backend with a mistyped key was once told only
                # that shoppers do not sign in here, and to send no Authorization header.
                raise RequestError(
                    401,
                    refused.code,
                    "This bearer token is neither a shop API key (one made in the console, "
                    "fsk_..., or one of SHOP_API_KEYS) nor a valid shopper token: "
                    + refused.message,
                    refused.details,
                    refused.headers,
                ) from None
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
