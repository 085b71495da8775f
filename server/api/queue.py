"""The waiting room's HTTP API (issue 17): a shopper joins, reads and leaves their ticket;
the operator reads a room's figures.

`POST|GET|DELETE /api/products/{id}/queue`, and `GET /api/queues`, the rooms' counts for
pages that poll (and at the root, like the rest of the shopper API: `shopper_routes` in
server/api/shop.py takes these). The caller is the shopper of the
request (server/api/identity.py): one ticket per shopper per product.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.admin import operator_only
from server.api.http import (
    DEFAULT_PAGE,
    IdsOrPageAfter,
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
from server.domain.clock import iso, now_ms
from server.domain.errors import ProductNotFound
from server.infra.clients import client_key
from server.infra.singleflight import SingleFlight
from server.service.waitingroom import COUNTS_SECONDS, RoomCounts, WaitingRoom
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
COUNTS_ETAG = header(
    "The answer's version (the counts and the `Link` to the next page): send it back in "
    "If-None-Match."
)
NO_SHOPPER = "no_shopper"


def room_of(request: Request) -> WaitingRoom:
    room: WaitingRoom = request.app.state.room
    return room


def _product_id(request: Request) -> int:
    product_id = path_id(request, "product_id")
    if product_id is None:
        raise ProductNotFound(path_sent(request, "product_id"))
    return product_id


def _etag(body: bytes, link: str | None = None) -> str:
    """A strong ETag of an answer: its body and its `Link` (a page's body may stay the same
    while a next page appears; a 304 would then keep the client from learning of it)."""
    digest = hashlib.blake2b(body, digest_size=12)
    if link is not None:
        digest.update(b"\nLink: " + link.encode())
    return '"' + digest.hexdigest() + '"'


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


class QueuesQuery(IdsOrPageAfter):
    """Which rooms' counts: those of `ids`, or a page of the rooms someone is in (`after`,
    `limit`; the first page of `DEFAULT_PAGE` when nothing is asked)."""


# How long a rendered answer of GET /api/queues is given again to the same query (s): its
# body and ETag are made once, not per request (a 304 cost as much as a 200: the rooms
# walked, the body made and hashed). No longer than the counts it carries may be old
# (`COUNTS_SECONDS`).
RENDERED_SECONDS = 1.0
# Answers kept at once, the least recently asked dropped first: a client may vary `ids`
# without end, and each variant is a query of its own.
RENDERED_QUERIES = 256
# A query as cached: the path asked (the `Link` names it), the ids (sorted, no repeats) or
# None, and the page's `after` and `limit`.
QueryKey = tuple[str, tuple[int, ...] | None, int, int]


@dataclass(frozen=True, slots=True)
class Rendered:
    """An answer of GET /api/queues as made: its body, ETag and `Link` (None: no next
    page), and until when (ms) it is given again."""

    body: bytes
    etag: str
    link: str | None
    until: int


class RenderedCounts:
    """The answers of GET /api/queues, one per distinct query, each made at most once every
    RENDERED_SECONDS (or sooner, when the oldest counts it carries would be read again),
    one at a time per query whoever asks; at most RENDERED_QUERIES of them kept."""

    def __init__(self, room: WaitingRoom) -> None:
        self._room = room
        self._answers: OrderedDict[QueryKey, Rendered] = OrderedDict()
        self._render_once: SingleFlight[QueryKey, Rendered] = SingleFlight(
            self._render, name="queue-counts-answer"
        )

    def __len__(self) -> int:
        """How many answers are kept (at most RENDERED_QUERIES)."""
        return len(self._answers)

    async def answer(self, key: QueryKey) -> Rendered:
        """The answer to `key`, as made within RENDERED_SECONDS, or made now. Raises
        StorageError when a read fails."""
        found = self._answers.get(key)
        if found is not None and now_ms() < found.until:
            self._answers.move_to_end(key)
            return found
        return await self._render_once(key)

    async def _render(self, key: QueryKey) -> Rendered:
        path, ids, after, limit = key
        link = None
        if ids is not None:
            counts = await self._room.counts(ids)
        else:
            listed = [i for i in await self._room.listed() if i > after]
            if len(listed) > limit:
                listed = listed[:limit]
                link = f'<{path}?after={listed[-1]}&limit={limit}>; rel="next"'
            counts = await self._room.counts(listed)
        made = now_ms()
        body = to_json(
            [
                {"productId": c.product_id, "waiting": c.waiting, "admitted": c.admitted}
                for c in counts
            ]
        )
        rendered = Rendered(body, _etag(body, link), link, _until(made, counts))
        self._answers[key] = rendered
        self._answers.move_to_end(key)
        while len(self._answers) > RENDERED_QUERIES:
            self._answers.popitem(last=False)
        return rendered


def _until(made: int, counts: list[RoomCounts]) -> int:
    """Until when an answer made at `made` (ms) of `counts` is given again: RENDERED_SECONDS,
    and no later than the oldest counts of a room someone is in are COUNTS_SECONDS old (an
    empty room's are kept longer: `WaitingRoom.counts`)."""
    until = made + round(RENDERED_SECONDS * 1000)
    for c in counts:
        if c.waiting or c.admitted:
            until = min(until, c.at + round(COUNTS_SECONDS * 1000))
    return until


def counts_answers(request: Request) -> RenderedCounts:
    """The app's RenderedCounts, made at its start-up with its waiting room (one per app)."""
    answers: RenderedCounts = request.app.state.queue_counts
    return answers


@operation(
    "listQueues",
    "Waiting room",
    "How many wait in each waiting room, and how many hold a pass",
    {
        "200": json(
            array(schemas.QueueCountsOut),
            "The rooms' counts, by product id",
            {
                "ETag": COUNTS_ETAG,
                "Cache-Control": CACHE_CONTROL,
                "Link": header(
                    "Without `ids`, the next page when there are more rooms: "
                    '`</api/queues?after=100&limit=100>; rel="next"`',
                    required=False,
                ),
            },
        ),
        "304": {
            "description": "Not modified: the ETag sent in If-None-Match is current",
            "headers": {"ETag": COUNTS_ETAG, "Cache-Control": CACHE_CONTROL},
        },
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        "503": DATABASE,
    },
    parameters=[*query_parameters(QueuesQuery), component_parameter("IfNoneMatch")],
    description="The polling fallback of the `queue` frames, for any page (no shopper or "
    "ticket needed), in the same fields: one entry per product with a waiting room (`queue` "
    "not `off`) among `ids`; without `ids`, a page (by product id) of the rooms someone is "
    "in (a ticket waiting or holding a pass) whose sale has not ended: a room whose sale "
    "ended, whose tickets have all ended, or that nobody has joined yet is not listed (its "
    "counts are 0; ask for it by id). Poll it with If-None-Match, at the pace of GET "
    "/api/products (every few seconds): each web process reads a room's counts at most once "
    "a second, and makes the answer to each distinct query at most once a second, however "
    "many pages ask.",
)
async def list_queues(request: Request) -> Response:
    query = parse_params(request.query_params, QueuesQuery)
    ids = None
    if query.ids is not None:
        ids = tuple(sorted(set(schemas.parse_product_ids(query.ids))))
    key = (request.scope["path"], ids, query.after or 0, query.limit or DEFAULT_PAGE)
    answer = await counts_answers(request).answer(key)
    headers = {"ETag": answer.etag, "Cache-Control": "no-cache"}
    if answer.link is not None:
        headers["Link"] = answer.link
    if _etag_matches(request, answer.etag):
        return Response(status_code=304, headers=headers)
    return json_response(answer.body, headers=headers)


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
