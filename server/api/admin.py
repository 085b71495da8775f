"""The operator API: only with `Authorization: Bearer $ADMIN_TOKEN`.

No token configured means no operator API at all (404, as if the routes did not exist);
a missing or wrong token is 401. Failed sign-ins are throttled per client
(`ADMIN_SIGN_IN_LIMIT`, 10 a minute by default, server/api/ratelimit.py: `FailureThrottle`):
past them every operator request from that client is answered 429
`too_many_failed_sign_ins` with `Retry-After`, whatever token it carries. 18,200 wrong
tokens in a row were once all answered at once.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.http import RequestError, json_response, parse_body, parse_params, path_id, shop_of
from server.api.ratelimit import FailureThrottle
from server.api.spec import (
    DATABASE,
    INVALID,
    INVALID_REQUEST,
    NO_OPERATOR_API,
    NOT_JSON,
    PRODUCT,
    PRODUCT_ID,
    PRODUCT_OR_NO_OPERATOR_API,
    SIGN_IN_THROTTLED_ANSWER,
    UNAUTHORIZED_ANSWER,
    array,
    error,
    json,
    json_body,
    operation,
    query_parameters,
    ref,
)
from server.domain.clock import now_ms
from server.domain.errors import ProductNotFound
from server.domain.inventory import Stats
from server.domain.model import Status
from server.infra.clients import client_key
from server.infra.metrics import DEFERRED, SIGN_IN_THROTTLED
from server.wire import schemas
from server.wire.schemas import (
    MAX_INT32,
    CreateProductBody,
    RestockBody,
    StatsOut,
    product_view,
    reservation_view,
)

Endpoint = Callable[[Request], Awaitable[Response]]


def operator_only(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        expected: str = request.app.state.settings.admin_token
        if not expected:
            raise HTTPException(404)
        throttle: FailureThrottle = request.app.state.sign_in_throttle
        client = client_key(request.scope)
        wait = throttle.retry_after(client)
        if wait is not None:
            DEFERRED.inc(SIGN_IN_THROTTLED)
            raise RequestError(
                429,
                "too_many_failed_sign_ins",
                f"Too many wrong operator tokens from your address; try again in {wait} seconds.",
                headers={"Retry-After": str(wait)},
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            throttle.failed(client)
            raise RequestError(
                401,
                "unauthorized",
                "This needs the operator token: send Authorization: Bearer <token>.",
            )
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


class ReservationQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    productId: Annotated[int | None, Field(ge=1, le=MAX_INT32)] = None
    status: Status | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


@operation(
    "createProduct",
    "Operator",
    "Create a product",
    {
        "201": json(ref(schemas.ProductOut), "The new product"),
        "400": INVALID,
        "401": UNAUTHORIZED_ANSWER,
        "429": SIGN_IN_THROTTLED_ANSWER,
        "404": NO_OPERATOR_API,
        "415": NOT_JSON,
        "503": DATABASE,
    },
    body=json_body(schemas.CreateProductBody),
    operator=True,
)
@operator_only
async def create_product(request: Request) -> Response:
    body = await parse_body(request, CreateProductBody)
    product = await shop_of(request).create_product(
        name=body.name,
        price_cents=int(body.price * 100),
        stock=body.stock,
        sale_starts_at=(
            None if body.sale_starts_at is None else int(body.sale_starts_at.timestamp() * 1000)
        ),
    )
    return json_response(product_view(product), 201)


@operation(
    "restockProduct",
    "Operator",
    "Add units to a product's stock",
    {
        "200": PRODUCT,
        "400": INVALID,
        "401": UNAUTHORIZED_ANSWER,
        "429": SIGN_IN_THROTTLED_ANSWER,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "415": NOT_JSON,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    body=json_body(schemas.RestockBody),
    operator=True,
)
@operator_only
async def restock(request: Request) -> Response:
    product_id = path_id(request, "product_id")
    body = await parse_body(request, RestockBody)
    if product_id is None:
        raise ProductNotFound(0)
    product = await shop_of(request).restock(product_id, body.quantity)
    return json_response(product_view(product))


@operation(
    "getProductStats",
    "Operator",
    "One product's units per state",
    {
        "200": json(ref(schemas.StatsOut), "Units per state"),
        "401": UNAUTHORIZED_ANSWER,
        "429": SIGN_IN_THROTTLED_ANSWER,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    operator=True,
)
@operator_only
async def product_stats(request: Request) -> Response:
    product_id = path_id(request, "product_id")
    found = [] if product_id is None else await shop_of(request).stats(product_id)
    if not found:
        raise ProductNotFound(product_id or 0)
    return json_response(_stats_out(found[0]))


@operation(
    "listStats",
    "Operator",
    "Every product's units per state",
    {
        "200": json(array(schemas.StatsOut), "Units per state, by product"),
        "401": UNAUTHORIZED_ANSWER,
        "429": SIGN_IN_THROTTLED_ANSWER,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    operator=True,
)
@operator_only
async def all_stats(request: Request) -> Response:
    """Units per state for every product (the console's live table)."""
    return json_response([_stats_out(s).model_dump() for s in await shop_of(request).stats()])


@operation(
    "listReservations",
    "Operator",
    "Reservations, newest first",
    {
        "200": json(
            array(schemas.ReservationOut),
            "The reservations, newest first (ACTIVE ones: the most time left first)",
        ),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        "401": UNAUTHORIZED_ANSWER,
        "429": SIGN_IN_THROTTLED_ANSWER,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=query_parameters(ReservationQuery),
    operator=True,
)
@operator_only
async def list_reservations(request: Request) -> Response:
    query = parse_params(request.query_params, ReservationQuery)
    shop = shop_of(request)
    reservations = await shop.reservations(
        product_id=query.productId, status=query.status, limit=query.limit
    )
    now = now_ms()
    out = []
    for reservation in reservations:
        product = await shop.product(reservation.product_id)
        assert product is not None
        out.append(reservation_view(reservation, product_view(product), now=now))
    return json_response(out)


def _stats_out(stats: Stats) -> StatsOut:
    return StatsOut(
        product_id=stats.product_id,
        total=stats.total,
        available=stats.available,
        held=stats.held,
        sold=stats.sold,
        expired=stats.expired,
        cancelled=stats.cancelled,
    )


routes = [
    Route("/api/admin/products", create_product, methods=["POST"]),
    Route("/api/admin/products/{product_id}/restock", restock, methods=["POST"]),
    Route("/api/admin/products/{product_id}/stats", product_stats, methods=["GET"]),
    Route("/api/admin/stats", all_stats, methods=["GET"]),
    Route("/api/admin/reservations", list_reservations, methods=["GET"]),
]
