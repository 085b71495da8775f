"""The operator API: only with `Authorization: Bearer $ADMIN_TOKEN`.

No token configured means no operator API at all (404, as if the routes did not exist);
a missing or wrong token is 401. Failed sign-ins are throttled per client
(`ADMIN_SIGN_IN_LIMIT`, 10 a minute by default, server/api/ratelimit.py: `FailureThrottle`):
past them every operator request from that client is answered 429
`too_many_failed_sign_ins` with `Retry-After`, whatever token it carries. 18,200 wrong
tokens in a row were once all answered at once. A client that runs out of tries is logged
once a window, not once an attempt. Wrong shop API keys are throttled apart
(server/api/completion.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.http import (
    DEFAULT_PAGE,
    PRODUCT_PATH_ID,
    IdsOrPageAfter,
    RequestError,
    json_response,
    parse_body,
    parse_params,
    shop_of,
    shown,
)
from server.api.ratelimit import FailureThrottle, refuse_if_out_of_tries
from server.api.spec import (
    DATABASE,
    INVALID,
    INVALID_REQUEST,
    NO_OPERATOR_API,
    NOT_JSON,
    OPERATOR_AUTH,
    PRODUCT,
    PRODUCT_ID,
    PRODUCT_OR_NO_OPERATOR_API,
    RESERVATION_ID,
    array,
    described,
    error,
    header,
    json,
    json_body,
    operation,
    query_parameters,
    ref,
)
from server.domain import clock, errors, ledger
from server.domain.clock import now_ms
from server.domain.errors import ReservationNotFound
from server.domain.inventory import UNSET, ProductChanges, Stats, is_reservation_id
from server.domain.model import Product, Status
from server.infra.clients import client_key
from server.infra.metrics import SIGN_IN_THROTTLED
from server.wire import schemas
from server.wire.schemas import (
    MAX_INT32,
    CreateProductBody,
    OperatorCancelBody,
    ReduceStockBody,
    RestockBody,
    StatsTotalsOut,
    UpdateProductBody,
    product_view,
    reservation_view,
)

Endpoint = Callable[[Request], Awaitable[Response]]


class NoQuery(BaseModel):
    """The query of an endpoint that takes none: any parameter is refused."""

    model_config = ConfigDict(extra="forbid")


def takes_query(endpoint: object) -> bool:
    """Whether the `@operation` of `endpoint` lists a query parameter."""
    found = described(endpoint)
    return found is not None and any(p.get("in") == "query" for p in found.parameters)


def operator_only(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        expected: str = request.app.state.settings.admin_token
        if not expected:
            raise HTTPException(404)
        throttle: FailureThrottle = request.app.state.sign_in_throttle
        client = client_key(request.scope)
        refuse_if_out_of_tries(
            throttle, client, wrong="operator tokens", refusals=SIGN_IN_THROTTLED
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
        if request.scope.get("query_string") and not takes_query(guarded):
            parse_params(request.query_params, NoQuery)
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


class StatsQuery(IdsOrPageAfter):
    """Which products' figures: a page of them by id (`after`, `limit`; the first page of
    `DEFAULT_PAGE` when nothing is asked), or those a page shows (`ids`)."""


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
        **OPERATOR_AUTH,
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
    limit = body.max_per_shopper
    if "max_per_shopper" not in body.model_fields_set:
        limit = request.app.state.settings.max_per_shopper
    product = await shop_of(request).create_product(
        name=body.name,
        price_cents=int(body.price * 100),
        stock=body.stock,
        sale_starts_at=_ms(body.sale_starts_at),
        max_per_shopper=limit,
        queue=body.queue,
        admit_factor=body.admit_factor,
    )
    return json_response(product_view(product), 201)


@operation(
    "restockProduct",
    "Operator",
    "Add units to a product's stock",
    {
        "200": PRODUCT,
        "400": INVALID,
        **OPERATOR_AUTH,
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
    body = await parse_body(request, RestockBody)
    product = await shop_of(request).restock(PRODUCT_PATH_ID.id(request), body.quantity)
    return json_response(product_view(product))


@operation(
    "getProductStats",
    "Operator",
    "One product's units per state",
    {
        "200": json(ref(schemas.StatsOut), "Units per state"),
        **OPERATOR_AUTH,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    operator=True,
)
@operator_only
async def product_stats(request: Request) -> Response:
    found = await shop_of(request).stats(PRODUCT_PATH_ID.id(request))
    if not found:
        raise PRODUCT_PATH_ID.not_found(request)
    return json_response(_stats_view(found[0]))


@operation(
    "listStats",
    "Operator",
    "Products' units per state, a page at a time (by id), or those a page shows",
    {
        "200": json(
            array(schemas.StatsOut),
            "Units per state, by product id",
            {
                "Link": header(
                    "The next page, when there are more products: "
                    '`</api/admin/stats?after=100&limit=100>; rel="next"`',
                    required=False,
                )
            },
        ),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=query_parameters(StatsQuery),
    operator=True,
    description=f"The counters on the products' rows: one row read per product answered, "
    "whatever the history. Without parameters, the first "
    f"{DEFAULT_PAGE:,} products by id (every product, for a shop with no more than "
    "that); the `Link` header leads to the next page. A console that shows some products "
    "asks for those (`ids`); the sums over every product are `GET /api/admin/stats/totals`.",
)
@operator_only
async def all_stats(request: Request) -> Response:
    """Units per state for a page of products, or for those asked for (the console's live
    table)."""
    query = parse_params(request.query_params, StatsQuery)
    shop = shop_of(request)
    headers: dict[str, str] = {}
    if query.ids is not None:
        found = await shop.stats(ids=schemas.parse_product_ids(query.ids))
    else:
        limit = query.limit or DEFAULT_PAGE
        found = await shop.stats(after=query.after or 0, limit=limit + 1)
        if len(found) > limit:
            found = found[:limit]
            headers["Link"] = (
                f'</api/admin/stats?after={found[-1].product_id}&limit={limit}>; rel="next"'
            )
    return json_response([_stats_view(s) for s in found], headers=headers)


@operation(
    "getStatsTotals",
    "Operator",
    "Every product's units per state, added up",
    {
        "200": json(ref(schemas.StatsTotalsOut), "The sums, and how many products"),
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    operator=True,
    description="A sum over the products' counters (one pass over the products, none over "
    "the holds).",
)
@operator_only
async def stats_totals(request: Request) -> Response:
    totals = await shop_of(request).stats_totals()
    return json_response(
        StatsTotalsOut(
            products=totals.products,
            total=totals.total,
            available=totals.available,
            held=totals.held,
            sold=totals.sold,
            expired=totals.expired,
            cancelled=totals.cancelled,
        ).model_dump()
    )


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
        **OPERATOR_AUTH,
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


# -- the operator's sale controls (issue 13, item 11) -------------------------------------

_CONTROL_ANSWERS = {
    "200": PRODUCT,
    **OPERATOR_AUTH,
    "404": PRODUCT_OR_NO_OPERATOR_API,
    "503": DATABASE,
}


def _ms(value: datetime | None) -> int | None:
    return None if value is None else clock.ms(value)


async def _edit(request: Request, changes: ProductChanges) -> Product:
    return await shop_of(request).update_product(PRODUCT_PATH_ID.id(request), changes)


@operation(
    "updateProduct",
    "Operator",
    "Edit a product: name, price, schedule, paused, limit per shopper",
    {
        **_CONTROL_ANSWERS,
        "400": INVALID,
        "409": error(
            "The sale would end before it starts, or a room with shoppers in it would switch "
            "between `fifo` and `random` (or, `random` without a start, be given one)",
            errors.InvalidSchedule.code,
            errors.QueueInUse.code,
        ),
        "415": NOT_JSON,
    },
    parameters=[PRODUCT_ID],
    body=json_body(schemas.UpdateProductBody),
    operator=True,
    description="Only the fields sent change; send at least one. No stock moves, so no "
    "ledger row; every page gets the product at once (a `product` frame). Rescheduling "
    "(`saleStartsAt`) or ending (`saleEndsAt`) applies to new holds only: holds already "
    "made can still be bought until they expire.",
)
@operator_only
async def update_product(request: Request) -> Response:
    product_id = PRODUCT_PATH_ID.id(request)
    body = await parse_body(request, UpdateProductBody)
    sent = body.model_fields_set
    if not sent:
        raise RequestError(
            400,
            "invalid_request",
            "Send at least one of name, price, saleStartsAt, saleEndsAt, paused, "
            "maxPerShopper, queue or admitFactor.",
        )
    changes = ProductChanges(
        name=body.name if "name" in sent and body.name is not None else UNSET,
        price_cents=(
            int(body.price * 100) if "price" in sent and body.price is not None else UNSET
        ),
        sale_starts_at=_ms(body.sale_starts_at) if "sale_starts_at" in sent else UNSET,
        sale_ends_at=_ms(body.sale_ends_at) if "sale_ends_at" in sent else UNSET,
        paused=body.paused if "paused" in sent and body.paused is not None else UNSET,
        max_per_shopper=body.max_per_shopper if "max_per_shopper" in sent else UNSET,
        queue=body.queue if "queue" in sent and body.queue is not None else UNSET,
        admit_factor=(
            body.admit_factor if "admit_factor" in sent and body.admit_factor is not None else UNSET
        ),
    )
    product = await shop_of(request).update_product(product_id, changes)
    return json_response(product_view(product))


@operation(
    "pauseProduct",
    "Operator",
    "Pause reservations of a product",
    _CONTROL_ANSWERS,
    parameters=[PRODUCT_ID],
    operator=True,
    description="New holds are refused with 409 `sale_paused` until it is resumed; holds "
    "already made can still be bought. Pausing a paused product changes nothing.",
)
@operator_only
async def pause_product(request: Request) -> Response:
    return json_response(product_view(await _edit(request, ProductChanges(paused=True))))


@operation(
    "resumeProduct",
    "Operator",
    "Resume reservations of a paused product",
    _CONTROL_ANSWERS,
    parameters=[PRODUCT_ID],
    operator=True,
)
@operator_only
async def resume_product(request: Request) -> Response:
    return json_response(product_view(await _edit(request, ProductChanges(paused=False))))


@operation(
    "endSale",
    "Operator",
    "End a product's sale now",
    {
        **_CONTROL_ANSWERS,
        "409": error("The sale has not started yet", errors.InvalidSchedule.code),
    },
    parameters=[PRODUCT_ID],
    operator=True,
    description="From now on new holds are refused with 409 `sale_ended`; holds already "
    "made can still be bought until they expire, and units left stay in stock (reopen with "
    "`PATCH` `saleEndsAt: null`). A sale that has not started cannot end before it starts: "
    "reschedule it instead.",
)
@operator_only
async def end_sale(request: Request) -> Response:
    product = await _edit(request, ProductChanges(sale_ends_at=now_ms()))
    return json_response(product_view(product))


@operation(
    "reduceStock",
    "Operator",
    "Take units away from a product's stock",
    {
        **_CONTROL_ANSWERS,
        "400": INVALID,
        "409": error(
            "Fewer units are neither held nor sold (`stock` in the body: the stock now)",
            errors.StockCommitted.code,
        ),
        "415": NOT_JSON,
    },
    parameters=[PRODUCT_ID],
    body=json_body(schemas.ReduceStockBody),
    operator=True,
    description="Out of the available units and the total, never below the units held "
    "and sold: one conditional update, so a hold made at the same moment is never undercut. "
    "Written to the ledger (`reduced`) and sent as `product.stock_reduced`.",
)
@operator_only
async def reduce_stock(request: Request) -> Response:
    product_id = PRODUCT_PATH_ID.id(request)
    body = await parse_body(request, ReduceStockBody)
    product = await shop_of(request).reduce_stock(product_id, body.quantity)
    return json_response(product_view(product))


@operation(
    "cancelReservationAsOperator",
    "Operator",
    "Cancel a shopper's hold",
    {
        "200": json(ref(schemas.ReservationOut), "The reservation, CANCELLED (again: unchanged)"),
        "400": INVALID,
        **OPERATOR_AUTH,
        "404": error(
            "There is no such reservation, or no operator API",
            errors.ReservationNotFound.code,
            "not_found",
        ),
        "409": error(
            "The hold was already bought, or expired",
            errors.ReservationCompleted.code,
            errors.ReservationExpired.code,
        ),
        "415": NOT_JSON,
        "503": DATABASE,
    },
    parameters=[RESERVATION_ID],
    body={
        "required": False,
        "content": {"application/json": {"schema": ref(schemas.OperatorCancelBody)}},
    },
    operator=True,
    description="Its units go back on sale. The shopper's page is told at once (a "
    "`reservation` frame: CANCELLED, `cancelledBy: operator`, the `reason` as "
    "`cancelReason`), the ledger records it as the operator's, and the shop gets "
    "`reservation.cancelled`.",
)
@operator_only
async def cancel_reservation(request: Request) -> Response:
    reason = None
    if await request.body():
        reason = (await parse_body(request, OperatorCancelBody)).reason.strip() or None
    reservation_id: str = request.path_params["reservation_id"]
    if not is_reservation_id(reservation_id):
        raise ReservationNotFound(shown(reservation_id))
    shop = shop_of(request)
    reservation = await shop.cancel(reservation_id, actor=ledger.OPERATOR, reason=reason)
    product = await shop.product(reservation.product_id)
    if product is None:
        raise ReservationNotFound(reservation_id)
    return json_response(reservation_view(reservation, product_view(product), now=now_ms()))


def _stats_view(stats: Stats) -> dict[str, int]:
    """A `StatsOut`, written out (one product's, and each of a page's): a page of a thousand
    through the model took four times as long (4.4 against 1.0 ms)."""
    return {
        "productId": stats.product_id,
        "total": stats.total,
        "available": stats.available,
        "held": stats.held,
        "sold": stats.sold,
        "expired": stats.expired,
        "cancelled": stats.cancelled,
    }


routes = [
    Route("/api/admin/products", create_product, methods=["POST"]),
    Route("/api/admin/products/{product_id}", update_product, methods=["PATCH"]),
    Route("/api/admin/products/{product_id}/restock", restock, methods=["POST"]),
    Route("/api/admin/products/{product_id}/reduce", reduce_stock, methods=["POST"]),
    Route("/api/admin/products/{product_id}/pause", pause_product, methods=["POST"]),
    Route("/api/admin/products/{product_id}/resume", resume_product, methods=["POST"]),
    Route("/api/admin/products/{product_id}/end", end_sale, methods=["POST"]),
    Route("/api/admin/products/{product_id}/stats", product_stats, methods=["GET"]),
    Route("/api/admin/stats", all_stats, methods=["GET"]),
    Route("/api/admin/stats/totals", stats_totals, methods=["GET"]),
    Route("/api/admin/reservations", list_reservations, methods=["GET"]),
    Route("/api/admin/reservations/{reservation_id}/cancel", cancel_reservation, methods=["POST"]),
]
