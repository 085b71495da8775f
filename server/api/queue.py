"""The waiting room's HTTP API (issue 17): a shopper joins, reads and leaves their ticket;
the operator reads a room's figures.

`POST|GET|DELETE /api/products/{id}/queue`, and `GET /api/queues`, the rooms' counts for
pages that poll (and at the root, like the rest of the shopper API: `shopper_routes` in
server/api/shop.py takes these). The caller is the shopper of the
request (server/api/identity.py): one ticket per shopper per product.
"""

from __future__ import annotations

import hashlib

from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.admin import operator_only
from server.api.http import (
    ProductIds,
    RequestError,
    json_response,
    parse_params,
    path_id,
    path_sent,
)
from server.api.identity import Shopper, shopper_of
from server.api.ratelimit import RateLimiter
from server.api.spec import (
    CACHE_CONTROL,
    DATABASE,
    INVALID_REQUEST,
    OPERATOR_AUTH,
    PRODUCT_ID,
    PRODUCT_OR_NO_OPERATOR_API,
    RATE_LIMITED,
    RETRY_AFTER,
    SHOP_KEY_REFUSED,
    SHOPPER_UNAUTHORIZED,
    UNAUTHORIZED,
    array,
    component_parameter,
    error,
    header,
    json,
    operation,
    query_parameters,
    ref,
)
from server.domain import errors
from server.domain.clock import iso
from server.domain.errors import ProductNotFound
from server.infra.clients import client_key
from server.service.waitingroom import WaitingRoom
from server.wire import schemas

TICKET = ref(schemas.TicketOut)
NO_PRODUCT_OR_ROOM = error("There is no such product", errors.ProductNotFound.code)
ROOM_CLOSED = error(
    "The product has no waiting room (reserve it directly), or its room is not open yet "
    "(`opensAt` in the body: QUEUE_OPENS_SECONDS before `saleStartsAt`)",
    errors.QueueOff.code,
    errors.QueueNotOpen.code,
)
TICKET_ETAG = header("The ticket's version: send it back in If-None-Match.")
COUNTS_ETAG = header("The counts' version: send it back in If-None-Match.")
NO_SHOPPER = "no_shopper"


def room_of(request: Request) -> WaitingRoom:
    room: WaitingRoom = request.app.state.room
    return room


def _product_id(request: Request) -> int:
    product_id = path_id(request, "product_id")
    if product_id is None:
        raise ProductNotFound(path_sent(request, "product_id"))
    return product_id


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _etag_matches(request: Request, etag: str) -> bool:
    """Whether If-None-Match names `etag`, or `*` (RFC 9110 §13.1.2); tags compare weakly."""
    sent = request.headers.get("if-none-match")
    return sent is not None and bool(
        {"*", etag} & {t.strip().removeprefix("W/") for t in sent.split(",")}
    )


def _shopper(request: Request) -> Shopper:
    shopper = shopper_of(request)
    if shopper is None:
        raise RequestError(
            401,
            NO_SHOPPER,
            "Joining a waiting room needs a shopper: the `shopper` cookie (set by the shop's "
            "page and by GET /api/me), its Shopper-Token, or the shop's token.",
        )
    return shopper


@operation(
    "joinQueue",
    "Waiting room",
    "Join a product's waiting room (again: the same ticket)",
    {
        "201": json(TICKET, "The new ticket, `waiting`"),
        "200": json(TICKET, "The caller's ticket, as it is: they had joined already"),
        "401": error(
            "The request names no shopper, or its token or cookie is not valid",
            NO_SHOPPER,
            UNAUTHORIZED,
        ),
        "403": SHOP_KEY_REFUSED,
        "404": NO_PRODUCT_OR_ROOM,
        "409": ROOM_CLOSED,
        "429": error(
            "Too many requests from this client (RESERVE_RATE_LIMIT)",
            RATE_LIMITED,
            headers={"Retry-After": RETRY_AFTER},
        ),
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    description="One ticket per shopper per product: joining again answers 200 with the "
    "same ticket (a ticket that ended `left`, `sold_out` or `lapsed` is opened again at the "
    "back of the line). In a `random` room, those who join before the sale starts are put in a "
    "random order (a secret key's, fixed at their joins: joining again gives the same place), "
    "shown at the start (`drawAt`; `position` is null until then). Joins count "
    "against RESERVE_RATE_LIMIT like reservations.",
)
async def join_queue(request: Request) -> Response:
    product_id = _product_id(request)
    shopper = _shopper(request)
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        wait = await limiter.retry_after(client_key(request.scope, shopper.id))
        if wait is not None:
            raise RequestError(
                429,
                RATE_LIMITED,
                f"Too many requests from you; try again in {wait} seconds.",
                headers={"Retry-After": str(wait)},
            )
    answer = await room_of(request).join(product_id, shopper.id)
    return json_response(answer.view, 201 if answer.created else 200)


@operation(
    "getQueueTicket",
    "Waiting room",
    "The caller's ticket in a product's waiting room",
    {
        "200": json(TICKET, "The ticket", {"ETag": TICKET_ETAG}),
        "304": {
            "description": "Not modified: the ETag sent in If-None-Match is current",
            "headers": {"ETag": TICKET_ETAG},
        },
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "404": error(
            "There is no such product, or the caller has no ticket for it",
            errors.ProductNotFound.code,
            errors.NoTicket.code,
        ),
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID, component_parameter("IfNoneMatch")],
    description="The polling fallback of the `ticket` frames: poll it with If-None-Match "
    "(about once a second is plenty: positions are read at most once a second).",
)
async def get_queue_ticket(request: Request) -> Response:
    product_id = _product_id(request)
    shopper = shopper_of(request)
    view = await room_of(request).ticket(product_id, None if shopper is None else shopper.id)
    stable = {k: v for k, v in view.items() if k != "serverTime"}
    etag = _etag(to_json(stable))
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return json_response(view, headers=headers)


@operation(
    "listQueues",
    "Waiting room",
    "How many wait in each waiting room, and how many hold a pass",
    {
        "200": json(
            array(schemas.QueueCountsOut),
            "The rooms' counts, by product id",
            {"ETag": COUNTS_ETAG, "Cache-Control": CACHE_CONTROL},
        ),
        "304": {
            "description": "Not modified: the ETag sent in If-None-Match is current",
            "headers": {"ETag": COUNTS_ETAG, "Cache-Control": CACHE_CONTROL},
        },
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        "503": DATABASE,
    },
    parameters=[*query_parameters(ProductIds), component_parameter("IfNoneMatch")],
    description="The polling fallback of the `queue` frames, for any page (no shopper or "
    "ticket needed): one entry per product with a waiting room (`queue` not `off`) among "
    "`ids` (or every product), in the same fields. Poll it with If-None-Match, at the pace "
    "of GET /api/products (every few seconds): each web process reads a room's counts at "
    "most once a second, however many pages ask.",
)
async def list_queues(request: Request) -> Response:
    query = parse_params(request.query_params, ProductIds)
    ids = None if query.ids is None else schemas.parse_product_ids(query.ids)
    counts = await room_of(request).counts(ids)
    body = to_json(
        [{"productId": c.product_id, "waiting": c.waiting, "admitted": c.admitted} for c in counts]
    )
    etag = _etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return json_response(body, headers=headers)


@operation(
    "leaveQueue",
    "Waiting room",
    "Leave a product's waiting room",
    {
        "204": {"description": "Left: the ticket is `left` (a pass not used goes to the next)"},
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "404": error(
            "There is no such product, or the caller has no ticket for it",
            errors.ProductNotFound.code,
            errors.NoTicket.code,
        ),
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    description="A ticket that has ended (reserved, sold out, lapsed) stays as it is; "
    "leaving twice is a 204 again.",
)
async def leave_queue(request: Request) -> Response:
    product_id = _product_id(request)
    shopper = shopper_of(request)
    await room_of(request).leave(product_id, None if shopper is None else shopper.id)
    return Response(status_code=204)


# The shopper API's part (served under /api and at the root with the rest of it).
queue_routes = [
    ("/queues", list_queues, ["GET"]),
    ("/products/{product_id}/queue", join_queue, ["POST"]),
    ("/products/{product_id}/queue", get_queue_ticket, ["GET"]),
    ("/products/{product_id}/queue", leave_queue, ["DELETE"]),
]


@operation(
    "getQueueStats",
    "Operator",
    "A product's waiting room: tickets by state, admissions",
    {
        "200": json(ref(schemas.RoomOut), "The room's figures"),
        **OPERATOR_AUTH,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID],
    operator=True,
    description="`reserved` counts passes used, `lapsed` passes that ran out unused; "
    "`admittedLastMinute` is the admission rate. The settings (`queue`, `admitFactor`) "
    "are the product's, changed with PATCH /api/admin/products/{{id}}.",
)
@operator_only
async def queue_stats(request: Request) -> Response:
    room = room_of(request)
    product, stats = await room.stats(_product_id(request))
    opens = room.opens_at(product) if product.queue != "off" else None
    counts = stats.by_state
    return json_response(
        {
            "productId": product.id,
            "queue": product.queue,
            "admitFactor": product.admit_factor,
            "waiting": counts["waiting"],
            "admitted": counts["admitted"],
            "reserved": counts["reserved"],
            "lapsed": counts["lapsed"],
            "soldOut": counts["sold_out"],
            "left": counts["left"],
            "admittedLastMinute": stats.admitted_last_minute,
            "opensAt": None if opens is None else iso(opens),
        }
    )


routes = [Route("/api/admin/products/{product_id}/queue", queue_stats, methods=["GET"])]
