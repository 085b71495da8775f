"""The shoppers' REST API: thin endpoints, parse → call the shop → render.

One route table (`shopper_routes`), served twice: under `/api` and at the root (`/products`,
`/reservations`, …), for clients written for the system this one replaces, which call the
API without a prefix (issue 16). Every hold a shopper makes is theirs
(server/api/identity.py): reading, completing or cancelling it needs its id and, when it
has a shopper, the same shopper; another gets 404, as for an unknown id.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.completion import COMPLETE_BY_SHOP, completion
from server.api.http import (
    DEFAULT_PAGE,
    PRODUCT_PATH_ID,
    IdsOrPage,
    PageLimit,
    RequestError,
    domain_response,
    header_text,
    json_response,
    parse_body,
    parse_params,
    shop_of,
    shown,
)
from server.api.identity import MINTED, Shopper, shopper_of
from server.api.queue import queue_routes
from server.api.ratelimit import RateLimiter, RecentKeys
from server.api.spec import (
    CACHE_CONTROL,
    DATABASE,
    ETAG,
    INVALID,
    INVALID_JSON,
    INVALID_REQUEST,
    NO_PRODUCT,
    NO_RESERVATION,
    NOT_JSON,
    PRODUCT,
    PRODUCT_ID,
    RATE_LIMITED,
    RESERVATION,
    RESERVATION_ID,
    RETRY_AFTER,
    SHOP_KEY_NOT_ALLOWED,
    SHOP_KEY_REFUSED,
    SHOPPER_UNAUTHORIZED,
    UNAUTHORIZED,
    array,
    component_parameter,
    error,
    header,
    json,
    json_body,
    operation,
    query_parameters,
    ref,
)
from server.domain import errors, ledger
from server.domain.clock import iso, now_ms
from server.domain.errors import (
    DomainError,
    IdempotencyKeyReused,
    InsufficientStock,
    ProductNotFound,
    ReservationNotFound,
    SaleEnded,
    SaleNotStarted,
    SalePaused,
    ShopperLimitReached,
)
from server.domain.inventory import ANYONE, Caller, Held, is_reservation_id
from server.domain.model import HoldRequest, Reservation, Status
from server.infra.clients import client_key
from server.infra.metrics import DEFERRED, RESERVATIONS
from server.service import idempotency
from server.service.catalog import Catalog
from server.service.shop import Shop
from server.service.waitingroom import WaitingRoom
from server.storage.errors import Busy, NotAttempted, StorageError, Unavailable
from server.wire import schemas
from server.wire.schemas import FieldError, ReserveBody, reservation_json, reservation_view

IDEMPOTENCY_KEY = "Idempotency-Key"


def _catalog(request: Request) -> Catalog:
    catalog = shop_of(request).catalog
    assert catalog is not None, "web processes have a catalog"
    return catalog


DEFAULT_MINE = 50
MAX_MINE = 200


class ProductsQuery(IdsOrPage):
    """Which products: every one (no parameter), those a page shows (`ids`), or a page of
    them, newest first (`limit`, `before`)."""

    limit: Annotated[
        PageLimit,
        Field(
            description=f"A page: the newest products, at most this many (default "
            f"{DEFAULT_PAGE} when `before` is given), listed by id; a `Link` header with "
            '`rel="next"` gives the address of the page of older ones when there are any.',
        ),
    ] = None
    before: Annotated[
        int | None,
        Field(
            ge=1,
            le=schemas.MAX_INT32,
            description="The page holds products with ids below this one (the `Link` "
            "header's next page says which).",
        ),
    ] = None


@operation(
    "listProducts",
    "Shop",
    "Products, by id: every one, those a page shows, or a page of them (newest first)",
    {
        "200": json(
            array(schemas.ProductOut),
            "The products, by id",
            {
                "ETag": ETAG,
                "Cache-Control": CACHE_CONTROL,
                "Link": header(
                    "The page of older products, when there is one: "
                    '`</api/products?before=58&limit=50>; rel="next"`',
                    required=False,
                ),
            },
        ),
        "304": {
            "description": "Not modified: the ETag sent in If-None-Match is current",
            "headers": {"ETag": ETAG, "Cache-Control": CACHE_CONTROL},
        },
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
    },
    parameters=[*query_parameters(ProductsQuery), component_parameter("IfNoneMatch")],
    description="Costs no query: the listing is kept current in the process. Poll it "
    "with If-None-Match when the WebSocket cannot be used. A page that shows a few products "
    "should ask for those (`ids`), or for a page of them, rather than for all: with 10,000 "
    "products the whole list is 1.35 MB.",
)
async def list_products(request: Request) -> Response:
    catalog = _catalog(request)
    headers = {"Cache-Control": "no-cache"}
    if not request.query_params:
        listing = catalog.listing()
    else:
        query = parse_params(request.query_params, ProductsQuery)
        if query.ids is not None:
            listing = catalog.selection(schemas.parse_product_ids(query.ids))
        else:
            limit = query.limit or DEFAULT_PAGE
            listing = catalog.page(before=query.before, limit=limit)
            if listing.next_before is not None:
                headers["Link"] = (
                    f'</api/products?before={listing.next_before}&limit={limit}>; rel="next"'
                )
    headers["ETag"] = listing.etag
    if _etag_matches(request.headers.get("if-none-match"), listing.etag):
        return Response(status_code=304, headers=headers)
    return json_response(listing.body, headers=headers)


@operation(
    "getProduct",
    "Shop",
    "One product",
    {"200": PRODUCT, "404": NO_PRODUCT, "503": DATABASE},
    parameters=[PRODUCT_ID],
)
async def get_product(request: Request) -> Response:
    product = await PRODUCT_PATH_ID.load(request, shop_of(request).product)
    return json_response(_catalog(request).view(product))


@operation(
    "createReservation",
    "Reservations",
    "Hold units of a product",
    {
        "201": json(
            ref(schemas.ReservationOut),
            "The hold, ACTIVE until `expiresAt`",
            {
                "Idempotent-Replayed": header(
                    "`true` when this is the answer to an earlier request with the "
                    "same Idempotency-Key.",
                    {"type": "string", "enum": ["true"]},
                    required=False,
                )
            },
        ),
        "400": INVALID,
        "404": NO_PRODUCT,
        "401": SHOPPER_UNAUTHORIZED,
        "403": error(
            "A waiting room is in front of the product and the shopper has no valid pass "
            "(`position` in the body); or the bearer token is a shop API key, which only "
            "completes holds",
            errors.NotAdmitted.code,
            SHOP_KEY_NOT_ALLOWED,
        ),
        "409": error(
            "Not enough units left (`stock` in the body: the product's stock now), the "
            "sale has not started, is paused by the operator, or has ended, or the shopper "
            "has as many units as the product's `maxPerShopper` allows (`limit` and `held` "
            "in the body)",
            errors.InsufficientStock.code,
            errors.SaleNotStarted.code,
            errors.SalePaused.code,
            errors.SaleEnded.code,
            errors.ShopperLimitReached.code,
        ),
        "415": NOT_JSON,
        "422": error(
            "The Idempotency-Key was used for a different request",
            errors.IdempotencyKeyReused.code,
        ),
        "429": error(
            "Too many reservations from this client (RESERVE_RATE_LIMIT)",
            RATE_LIMITED,
            headers={"Retry-After": RETRY_AFTER},
        ),
        "503": DATABASE,
    },
    parameters=[component_parameter("IdempotencyKey")],
    body=json_body(schemas.ReserveBody),
    description="`quantity` is from 1 to MAX_QUANTITY (here {max_quantity}). Integers "
    'must be JSON integers (not 1.0, 1.5, "2" or true); unknown fields are refused.',
)
async def create_reservation(request: Request) -> Response:
    try:
        response = await _create_reservation(request)
    except DomainError as exc:
        DEFERRED.inc(_RESERVATION_OUTCOMES.get(type(exc), _OTHER_OUTCOME))
        # Answered here, not raised to the app's handler: the same answer, cheaper, for
        # the refusals that are most of a storm's answers (`domain_response`).
        return domain_response(request, exc)
    except (RequestError, StorageError) as exc:
        if isinstance(exc, RequestError) and exc.status == 429:
            DEFERRED.inc(_RATE_LIMITED)
        else:
            DEFERRED.inc(_RESERVATION_OUTCOMES.get(type(exc), _OTHER_OUTCOME))
        raise
    DEFERRED.inc(_REPLAYED if "idempotent-replayed" in response.headers else _HELD)
    return response


async def _create_reservation(request: Request) -> Response:
    shop = shop_of(request)
    shopper = shopper_of(request)
    body = await parse_body(
        request, ReserveBody, {"max_quantity": request.app.state.settings.max_quantity}
    )
    key = idempotency_key(request)
    if key is not None:
        key = idempotency.scoped_key(shopper.id if shopper else client_key(request.scope), key)
    hold = HoldRequest(
        body.product_id, body.quantity, key, shopper_id=shopper.id if shopper else None
    )
    limiter: RateLimiter | None = request.app.state.rate_limiter
    recent_keys: RecentKeys = request.app.state.recent_keys
    if limiter is not None:
        # Counted against the shopper when the shop signed them in (many shoppers may share
        # an address: an office, a mobile carrier's NAT), else against the address: an
        # anonymous shopper's cookie costs nothing to replace, so counting per cookie would
        # let one address make any number of reservations.
        client = client_key(request.scope, shopper.id if shopper else None)
        # The limit comes before the database: a client already at its limit (as this
        # process knows without asking anyone) is refused at once, unless its key made a
        # hold here (`RecentKeys`). Otherwise a limited client could make the shop read
        # its key index once a request with fresh keys.
        wait = limiter.over(client)
        if wait is not None and not (key is not None and key in recent_keys):
            raise _rate_limited(wait)
        # A retry is answered before it is counted (issue 15, item 4): a shopper whose 201
        # was lost must be able to learn their own hold while it lasts. A copy of a request
        # still waiting here is counted like any request: it joins that request, but a
        # client could send any number of them, each a walk through the reservation path.
        replay = await shop.replay(hold)
        if replay is not None:
            assert key is not None, "only a keyed request is a replay"
            recent_keys.add(key)
            return await render_reservation(shop, replay, 201, _REPLAYED_HEADERS)
        wait = await limiter.retry_after(client)
        if wait is not None:
            raise _rate_limited(wait)
    held = await shop.reserve(hold)
    if key is not None:
        recent_keys.add(key)
    headers = _REPLAYED_HEADERS if held.replayed else None
    return await render_reservation(shop, held, 201, headers)


def _rate_limited(wait: int) -> RequestError:
    return RequestError(
        429,
        "rate_limited",
        f"Too many reservations from you; try again in {wait} seconds.",
        headers={"Retry-After": str(wait)},
    )


_REPLAYED_HEADERS = {"Idempotent-Replayed": "true"}
_HELD = RESERVATIONS.labels("held")
_REPLAYED = RESERVATIONS.labels("replayed")
_RATE_LIMITED = RESERVATIONS.labels("rate_limited")
_OTHER_OUTCOME = RESERVATIONS.labels("other")
_RESERVATION_OUTCOMES = {
    InsufficientStock: RESERVATIONS.labels("insufficient_stock"),
    SaleNotStarted: RESERVATIONS.labels("sale_not_started"),
    SalePaused: RESERVATIONS.labels("sale_paused"),
    SaleEnded: RESERVATIONS.labels("sale_ended"),
    ProductNotFound: RESERVATIONS.labels("not_found"),
    IdempotencyKeyReused: RESERVATIONS.labels("invalid"),
    ShopperLimitReached: RESERVATIONS.labels("shopper_limit"),
    RequestError: RESERVATIONS.labels("invalid"),
    Busy: RESERVATIONS.labels("busy"),
    NotAttempted: RESERVATIONS.labels("busy"),
    Unavailable: RESERVATIONS.labels("busy"),
}


@operation(
    "getReservation",
    "Reservations",
    "A hold's current state",
    {
        "200": RESERVATION,
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "404": NO_RESERVATION,
        "503": DATABASE,
    },
    parameters=[RESERVATION_ID],
)
async def get_reservation(request: Request) -> Response:
    shop = shop_of(request)
    reservation = await shop.reservation(_known_id(request), _caller(request))
    if reservation is None:
        raise ReservationNotFound(request.path_params["reservation_id"])
    return await render_reservation(shop, reservation)


@operation(
    "completeReservation",
    "Reservations",
    "Buy the held units (idempotent)",
    {
        "200": json(ref(schemas.ReservationOut), "The reservation, COMPLETED (again: unchanged)"),
        "400": error(
            "The body is not a completion, or has an orderReference without a shop key",
            INVALID_REQUEST,
            INVALID_JSON,
        ),
        "401": error(
            "The shop API key is not valid, or was revoked; or the shopper's token or "
            "cookie is not valid (or REQUIRE_SHOPPER_TOKEN and there is none)",
            UNAUTHORIZED,
        ),
        "403": error("Only the shop's backend completes holds here", COMPLETE_BY_SHOP),
        "404": NO_RESERVATION,
        "429": error(
            "Too many wrong shop API keys or shopper tokens from this client lately "
            "(ADMIN_SIGN_IN_LIMIT): refused for any bearer token until a try is earned back",
            "too_many_failed_sign_ins",
            headers={"Retry-After": RETRY_AFTER},
        ),
        "409": error(
            "The hold expired or was cancelled",
            errors.ReservationExpired.code,
            errors.ReservationCancelled.code,
        ),
        "503": DATABASE,
    },
    parameters=[RESERVATION_ID],
    body={
        "required": False,
        "content": {"application/json": {"schema": ref(schemas.CompleteBody)}},
    },
    description="The shop's backend completes with `Authorization: Bearer <shop API key>` "
    "(SHOP_API_KEYS, or a key made in the console) once it has taken the payment, and may "
    "send its `orderReference`. Without a key it is the shopper's own call, refused with 403 "
    "`complete_by_shop` when COMPLETE_BY=shop.",
)
async def complete_reservation(request: Request) -> Response:
    shop = shop_of(request)
    reservation_id = _known_id(request)
    who = await completion(request)
    caller: Caller = ANYONE if who.actor == ledger.SHOP else _caller(request)
    reservation = await shop.complete(
        reservation_id, actor=who.actor, order_reference=who.order_reference, caller=caller
    )
    return await render_reservation(shop, reservation)


@operation(
    "cancelReservation",
    "Reservations",
    "Give the held units back (idempotent)",
    {
        "200": json(ref(schemas.ReservationOut), "The reservation, CANCELLED (again: unchanged)"),
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "404": NO_RESERVATION,
        "409": error(
            "The hold was already bought, or expired",
            errors.ReservationCompleted.code,
            errors.ReservationExpired.code,
        ),
        "503": DATABASE,
    },
    parameters=[RESERVATION_ID],
)
async def cancel_reservation(request: Request) -> Response:
    shop = shop_of(request)
    reservation_id = _known_id(request)
    reservation = await shop.cancel(reservation_id, caller=_caller(request))
    return await render_reservation(shop, reservation)


@operation(
    "getConfig",
    "Shop",
    "The limits a page needs, and the server's time",
    {"200": json(ref(schemas.ConfigOut), "The limits")},
)
async def config(request: Request) -> Response:
    """What a page needs to know to behave: the limits, the currency, the server's time."""
    settings = request.app.state.settings
    return json_response(
        {
            "maxQuantity": settings.max_quantity,
            "currency": settings.currency,
            "holdSeconds": settings.hold_seconds,
            "queueOpensSeconds": settings.queue_opens_seconds,
            "passSeconds": settings.pass_seconds,
            "serverTime": iso(now_ms()),
        }
    )


async def render_reservation(
    shop: Shop,
    reservation: Reservation | Held,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    if isinstance(reservation, Held):
        reservation = reservation.reservation
    product = await shop.product(reservation.product_id)
    assert product is not None, "a hold's product cannot vanish"
    catalog = shop.catalog
    assert catalog is not None, "web processes have a catalog"
    body = reservation_json(reservation, catalog.view_json(product), now=now_ms())
    return json_response(body, status, headers)


def _caller(request: Request) -> str | None:
    """The shopper acting on a hold (None: the request names none)."""
    shopper = shopper_of(request)
    return None if shopper is None else shopper.id


def _known_id(request: Request) -> str:
    reservation_id: str = request.path_params["reservation_id"]
    if not is_reservation_id(reservation_id):
        raise ReservationNotFound(shown(reservation_id))
    return reservation_id


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, or None; 400 naming the header if it is not 1 to
    `MAX_KEY_LENGTH` printable ASCII characters, or if it is sent more than once: we would
    read the first, and a proxy, cache or log that reads the last (or joins them) would see
    another request, as with a JSON key named twice."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if (sent := len(request.headers.getlist("idempotency-key"))) > 1:
        rule = "must be sent once"
        raise RequestError(
            400,
            "invalid_request",
            f"{IDEMPOTENCY_KEY}: {rule}; {sent} were sent.",
            [FieldError(field=IDEMPOTENCY_KEY, message=rule)],
        )
    header_text(IDEMPOTENCY_KEY, key, idempotency.MAX_KEY_LENGTH)
    if not idempotency.is_valid_key(key):
        rule = f"must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII characters"
        raise RequestError(
            400,
            "invalid_request",
            f'{IDEMPOTENCY_KEY}: {rule}; "{shown(key)}" was sent.',
            [FieldError(field=IDEMPOTENCY_KEY, message=rule)],
        )
    return key


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


class MyReservationsQuery(BaseModel):
    """Which of the caller's holds: newest first, at most `limit`, only `status` if given."""

    model_config = ConfigDict(extra="forbid")

    status: Annotated[
        Status | None,
        Field(
            description="Only holds in this state (ACTIVE: the ones to restore on a page), "
            "among the shopper's 1,000 newest holds."
        ),
    ] = None
    limit: Annotated[int, Field(ge=1, le=MAX_MINE, description="At most this many.")] = DEFAULT_MINE


@operation(
    "listMyReservations",
    "Reservations",
    "The caller's own holds, newest first",
    {
        "200": json(
            array(schemas.ReservationOut),
            "The holds the caller's shopper made, newest first (none for a caller that "
            "names no shopper)",
        ),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "503": DATABASE,
    },
    parameters=query_parameters(MyReservationsQuery),
    description="The same list at `GET /api/reservations` (and `GET /reservations`), for "
    'clients that load "my reservations" there. A page restores its holds from it: the '
    "shopper is the cookie this service set, or the shop's token.",
)
async def my_reservations(request: Request) -> Response:
    shopper = shopper_of(request)
    query = parse_params(request.query_params, MyReservationsQuery)
    if shopper is None:
        return json_response([])
    shop = shop_of(request)
    holds = await shop.shopper_reservations(shopper.id, status=query.status, limit=query.limit)
    now = now_ms()
    catalog = _catalog(request)
    out = []
    for reservation in holds:
        product = await shop.product(reservation.product_id)
        assert product is not None, "a hold's product cannot vanish"
        out.append(reservation_view(reservation, catalog.view(product), now=now))
    return json_response(out)


@operation(
    "listReservationsOfCaller",
    "Reservations",
    "The caller's own holds, newest first (as `GET /api/me/reservations`)",
    {
        "200": json(array(schemas.ReservationOut), "The caller's holds, newest first"),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "503": DATABASE,
    },
    parameters=query_parameters(MyReservationsQuery),
    description='For clients written for the system this one replaces, which load "my '
    "reservations\" from `GET /reservations`. Never another shopper's holds.",
)
async def reservations_of_caller(request: Request) -> Response:
    return await my_reservations(request)


@operation(
    "getMe",
    "Shop",
    "Who the caller is to the shop, and their units of each product",
    {
        "200": json(ref(schemas.MeOut), "The caller"),
        "401": SHOPPER_UNAUTHORIZED,
        "403": SHOP_KEY_REFUSED,
        "503": DATABASE,
    },
    description="A caller without a shopper is given an anonymous one: the `shopper` cookie "
    "comes with the answer, and `token`, the same value, to send as a `Shopper-Token` header "
    "by a client that keeps no cookies. "
    "`units`: per product, the units in the shopper's ACTIVE and COMPLETED holds, "
    'which count against the product\'s `maxPerShopper`. A page shows "you have 1" and '
    "offers at most `maxPerShopper` minus that. Exact for a product with a "
    "`maxPerShopper`; for any other, counted from the holds made within the hold time "
    "(every one that can be ACTIVE) and the shopper's 200 newest, so that the answer "
    "costs the same however many holds the shopper made: older purchases are not "
    "counted (`GET /api/me/reservations` lists holds, newest first). "
    "`tickets`: the products in whose waiting room the shopper has a ticket (at most 100, "
    "open ones first): `GET /api/products/{{id}}/queue` answers those, and 404 `no_ticket` "
    "for any other.",
)
async def me(request: Request) -> Response:
    shopper = shopper_of(request)
    token = None
    if shopper is None and (minted := request.scope.get(MINTED)) is not None:
        # A new anonymous shopper: the cookie comes with this answer, and the token too,
        # for a client that keeps no cookies (only now: a page's scripts never see it).
        shopper, token = Shopper(minted[0], signed_in=False), minted[1]
    if shopper is None:
        return json_response(
            {"shopper": None, "signedIn": False, "token": None, "units": {}, "tickets": []}
        )
    units = await shop_of(request).shopper_units(shopper.id)
    # The rooms the shopper has a ticket in: the shop page asks for those tickets alone,
    # where it asked for one in every room it showed and each 404 was an error in the
    # browser's console. No query while no product has a room.
    room: WaitingRoom | None = getattr(request.app.state, "room", None)
    tickets = []
    if token is None and room is not None and room.any_rooms():
        tickets = sorted({t.product_id for t in await room.tickets_of_shopper(shopper.id)})
    return json_response(
        {
            "shopper": shopper.id,
            "signedIn": shopper.signed_in,
            "token": token,
            "units": {str(product_id): n for product_id, n in sorted(units.items())},
            "tickets": tickets,
        }
    )


# The shopper API, as paths below a prefix: served under `/api` and at the root.
shopper_routes = [
    ("/products", list_products, ["GET"]),
    ("/products/{product_id}", get_product, ["GET"]),
    ("/reservations", create_reservation, ["POST"]),
    ("/reservations", reservations_of_caller, ["GET"]),
    ("/reservations/{reservation_id}", get_reservation, ["GET"]),
    ("/reservations/{reservation_id}/complete", complete_reservation, ["POST"]),
    ("/reservations/{reservation_id}/cancel", cancel_reservation, ["POST"]),
    ("/me", me, ["GET"]),
    ("/me/reservations", my_reservations, ["GET"]),
    ("/config", config, ["GET"]),
    *queue_routes,
]
ROOT_PREFIX = ""
API_PREFIX = "/api"

# Under /api, in the OpenAPI document; at the root, the same endpoints, which the document
# mentions once (its description) rather than listing every operation twice.
routes = [
    *(
        Route(API_PREFIX + path, endpoint, methods=methods)
        for path, endpoint, methods in shopper_routes
    ),
    *(
        Route(ROOT_PREFIX + path, endpoint, methods=methods, include_in_schema=False)
        for path, endpoint, methods in shopper_routes
    ),
]
