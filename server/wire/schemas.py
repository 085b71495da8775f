"""The shapes of the HTTP API and the live frames: request bodies, responses, errors.

Requests are validated strictly: integers are JSON integers (not 1.5, "2" or true) and
unknown fields are refused.

The response models are the schema (the OpenAPI document is generated from them). The hot
paths render plain dicts (`product_view`, `reservation_view`) instead of building model
instances, which cost 3× as much per response; tests validate every view against its model,
so the two cannot drift apart.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import httpx
from annotated_types import MaxLen, MinLen
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import to_json

from server.domain import text
from server.domain.clock import iso
from server.domain.inventory import RESERVATION_ID_CHARS
from server.domain.model import Product, Reservation, Status
from server.domain.waitingroom import (
    Lineup,
    Ticket,
    TicketState,
    draws,
    order_hidden,
    passes_for,
)

MAX_INT32 = 2**31 - 1
# Products a page may name in `GET /api/products?ids=` and `/ws?ids=`: more than any page
# shows, few enough that the answer stays small.
MAX_PRODUCT_IDS = 100
PRODUCT_IDS_RULE = f"at most {MAX_PRODUCT_IDS} product ids, comma-separated (e.g. 3,8,9)"


def parse_product_ids(text: str) -> frozenset[int]:
    """`"3,8,9"` → `{3, 8, 9}`. Raises `ValueError` (saying `PRODUCT_IDS_RULE`) for anything
    else: an empty list, more than `MAX_PRODUCT_IDS`, or an id that is not 1 to 2³¹−1."""
    parts = text.split(",")
    if not text or len(parts) > MAX_PRODUCT_IDS:
        raise ValueError(PRODUCT_IDS_RULE)
    ids = set()
    for part in parts:
        if not (part.isascii() and part.isdigit() and len(part) <= 10):
            raise ValueError(PRODUCT_IDS_RULE)
        value = int(part)
        if not 1 <= value <= MAX_INT32:
            raise ValueError(PRODUCT_IDS_RULE)
        ids.add(value)
    return frozenset(ids)


def _storable(value: str) -> str:
    """The rule for stored text (`server.domain.text`): no U+0000, no lone surrogate. The
    field's own `max_length` bounds it, checked first."""
    found = text.problem(value, len(value))
    if found is not None:
        raise ValueError(found)
    return value


# Every string of a request that is stored or logged: a name, a URL, a query parameter. Use
# it with a `max_length` (`Annotated[StoredText, Field(max_length=…)]`); a test checks that
# every string field of every request is one.
StoredText = Annotated[str, AfterValidator(_storable)]


def _not_blank(value: str) -> str:
    """A name with something in it, stripped."""
    if not value.strip():
        raise ValueError("the name cannot be blank")
    return value.strip()


def _in_utc_years(value: datetime) -> datetime:
    """The time in UTC. 9999-12-31T23:59:59-05:00 is year 10000 in UTC: no ISO-8601 time
    could show it."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time must fall within the years 1 to 9999 in UTC") from None


# A product's name as the operator sends it: stored text, not blank, stripped.
ProductName = Annotated[StoredText, MinLen(1), MaxLen(200), AfterValidator(_not_blank)]
# A price in the shop's currency (the field says so in its description).
Price = Annotated[Decimal, Field(ge=0, le=10_000_000, decimal_places=2, allow_inf_nan=False)]
PRICE_DESCRIPTION = "In the shop's currency, at most 2 decimals."
# A time the operator sets (a sale's start or end): with an offset, in UTC once read.
SaleTime = Annotated[AwareDatetime, AfterValidator(_in_utc_years)]


MAX_STOCK = 1_000_000_000
DEFAULT_MAX_QUANTITY = 10

# Times go out as text in one format, `2026-11-24T22:30:00.123Z` (server.domain.clock.iso).
_TIME: dict[str, Any] = {"format": "date-time"}

ProductId = Annotated[int, Field(ge=1, le=MAX_INT32, description="A product's id.")]


class _Request(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=False
    )


class _Response(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, serialize_by_alias=True, validate_by_name=True
    )


# -- requests ----------------------------------------------------------------------------


class ReserveBody(_Request):
    product_id: ProductId
    quantity: Annotated[
        int,
        Field(ge=1, le=MAX_INT32, description="Units to hold, from 1 to MAX_QUANTITY."),
    ]

    @field_validator("quantity")
    @classmethod
    def _at_most_max_quantity(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_quantity", DEFAULT_MAX_QUANTITY)
        if value > limit:
            raise ValueError(f"at most {limit} units can be held at once")
        return value


MaxPerShopper = Annotated[
    int | None,
    Field(
        ge=1,
        le=MAX_STOCK,
        description="Units one shopper may have in active and completed holds together; "
        "null: no limit.",
    ),
]

QueueMode = Literal["off", "fifo", "random"]
QUEUE_DESCRIPTION = (
    "The waiting room: `off` (none: first come, first served), `fifo` (arrival order) or "
    "`random` (those who join before the sale starts are put in a random order at the "
    "start; later arrivals follow in arrival order). The room opens QUEUE_OPENS_SECONDS "
    "before `saleStartsAt`; without a start time it is a waitlist for when nothing is "
    "available."
)
MAX_ADMIT_FACTOR = 100.0
AdmitFactor = Annotated[
    float,
    Field(
        gt=0,
        le=MAX_ADMIT_FACTOR,
        allow_inf_nan=False,
        description="Shoppers admitted per unit available (per `maxPerShopper` units when "
        "the product has a limit): 1.0 admits exactly as many as can buy; more admits "
        "extra, for shoppers who are admitted and do not reserve.",
    ),
]


class CreateProductBody(_Request):
    name: ProductName
    price: Price = Field(description=PRICE_DESCRIPTION)
    stock: Annotated[int, Field(ge=0, le=MAX_STOCK)]
    sale_starts_at: SaleTime | None = Field(
        default=None, description="ISO-8601 time with an offset; before it, holds are refused."
    )
    max_per_shopper: MaxPerShopper = Field(
        default=None,
        description="Units one shopper may have in active and completed holds together. "
        "Left out: MAX_PER_SHOPPER (none when unset); null: no limit.",
    )
    queue: QueueMode = Field(default="off", description=QUEUE_DESCRIPTION)
    admit_factor: AdmitFactor = 1.0


class RestockBody(_Request):
    quantity: Annotated[int, Field(ge=1, le=MAX_STOCK)]


class ReduceStockBody(_Request):
    quantity: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_STOCK,
            description="Units to take away: at most the available ones (never held or sold).",
        ),
    ]


class UpdateProductBody(_Request):
    """An operator's edit: only the fields sent change; at least one must be sent."""

    name: ProductName | None = None
    price: Price | None = Field(default=None, description=PRICE_DESCRIPTION)
    sale_starts_at: SaleTime | None = Field(
        default=None,
        description="Reschedule: ISO-8601 time with an offset; null: on sale at once.",
    )
    sale_ends_at: SaleTime | None = Field(
        default=None,
        description="When the sale ends: ISO-8601 time with an offset; null: it does not end.",
    )
    paused: bool | None = Field(
        default=None, description="true pauses reservations, false resumes them."
    )
    max_per_shopper: MaxPerShopper = Field(
        default=None,
        description="Units one shopper may have in active and completed holds together; "
        "null: no limit. Lowered below what a shopper has, it takes nothing from them.",
    )
    queue: QueueMode | None = Field(default=None, description=QUEUE_DESCRIPTION)
    admit_factor: AdmitFactor | None = None

    @field_validator("name")
    @classmethod
    def _name_not_null(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError("the name cannot be null")
        return value

    @field_validator("price", "paused", "queue", "admit_factor")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("cannot be null")
        return value


CANCEL_REASON_MAX = 200


class OperatorCancelBody(_Request):
    reason: Annotated[
        StoredText,
        Field(
            max_length=CANCEL_REASON_MAX,
            description='Shown to the shopper whose hold it was, e.g. "Payment declined".',
        ),
    ] = ""


# -- responses ---------------------------------------------------------------------------


class ProductOut(_Response):
    id: int
    name: str
    price: float = Field(
        description="In the shop's currency (`currency` in /api/config), exact to the cent: "
        "stored as integer cents."
    )
    available_stock: int
    held_stock: int = Field(
        description="Units in active holds: not on sale now, but back on sale if their holds "
        "end unbought (a product with none available and some held is not sold out yet)."
    )
    total_stock: int
    version: int = Field(description="Goes up by at least 1 on every stock change.")
    sale_starts_at: str | None = Field(
        description="ISO-8601 UTC, or null: on sale now.", json_schema_extra=_TIME
    )
    sale_ends_at: str | None = Field(
        default=None,
        description="ISO-8601 UTC: from then on no new holds (409 `sale_ended`); null: the "
        "sale does not end.",
        json_schema_extra=_TIME,
    )
    paused: bool = Field(
        default=False,
        description="The operator paused reservations: new holds are refused (409 "
        "`sale_paused`) until resumed; holds already made can still be bought.",
    )
    max_per_shopper: int | None = Field(
        default=None,
        description="Units of this product one shopper may have in active and completed "
        "holds together, or null: no limit (MAX_PER_SHOPPER is the default for new products).",
    )
    queue: QueueMode = Field(default="off", description=QUEUE_DESCRIPTION)
    admit_factor: float = Field(
        default=1.0, description="Shoppers the waiting room admits per unit available."
    )


class ReservationOut(_Response):
    id: str = Field(description="Opaque and unguessable: whoever knows it can act on the hold.")
    product_id: int
    quantity: int
    status: Status = Field(
        description="ACTIVE until completed, cancelled or expired. A hold whose expiresAt has "
        "passed is shown as EXPIRED even before the worker has restored its units."
    )
    created_at: str = Field(json_schema_extra=_TIME)
    expires_at: str = Field(json_schema_extra=_TIME)
    completed_at: str | None = Field(json_schema_extra=_TIME)
    order_reference: str | None = Field(
        default=None,
        description="What the shop's backend called the order when it completed the hold.",
    )
    cancelled_by: Literal["shopper", "operator"] | None = Field(
        default=None, description="Who cancelled the hold, if it was cancelled."
    )
    cancel_reason: str | None = Field(
        default=None, description="The operator's reason, when the shop cancelled the hold."
    )
    product: ProductOut
    server_time: str = Field(
        description="The server's clock when this was rendered.", json_schema_extra=_TIME
    )


class MeOut(_Response):
    shopper: str | None = Field(
        description="`anon:<id>` (the cookie this service set), `shop:<sub>` (signed in by "
        "the shop), or null: the request names no shopper."
    )
    signed_in: bool
    token: str | None = Field(
        description="Only when this answer made the shopper: their token (the cookie's "
        "value), to send as `Shopper-Token` from a client that keeps no cookies."
    )
    units: dict[str, int] = Field(
        description="Per product id, the shopper's units in ACTIVE and COMPLETED holds: "
        "exact for a product with `maxPerShopper`; for any other, from the holds made "
        "within the hold time and the shopper's 200 newest (older purchases not counted)."
    )
    tickets: list[int] = Field(
        description="The ids of the products in whose waiting room the shopper has a ticket "
        "(at most 100, open ones first): `GET /api/products/{id}/queue` answers those, and "
        "404 `no_ticket` any other."
    )


class FieldError(_Response):
    field: str = Field(description="Where in the body, dotted; empty for the body as a whole.")
    message: str


class StockOut(_Response):
    """A product's stock at one moment, as a `stock` frame gives it."""

    product_id: int
    available_stock: int
    held_stock: int = Field(
        description="Units in active holds: not on sale now, but back on sale if their holds "
        "end unbought (a product with none available and some held is not sold out yet)."
    )
    version: int = Field(description="The product's version: keep the highest one seen.")


class ErrorOut(_Response):
    status_code: int
    error: str = Field(description="The HTTP reason phrase.")
    code: str = Field(description="Stable, for programs: insufficient_stock, invalid_request…")
    message: str = Field(description="One human sentence.")
    details: list[FieldError] | None = None
    stock: StockOut | None = Field(
        default=None,
        description="With 409 `insufficient_stock`: the product's stock when the request was "
        "refused, to show at once (apply it as a `stock` frame, by `version`).",
    )
    limit: int | None = Field(
        default=None,
        description="With 409 `shopper_limit_reached`: the product's `maxPerShopper`.",
    )
    held: int | None = Field(
        default=None,
        description="With 409 `shopper_limit_reached`: the units of the product the shopper "
        "has now, in ACTIVE and COMPLETED holds.",
    )
    position: int | None = Field(
        default=None,
        description="With 403 `not_admitted`: the shopper's place in the waiting room (1 = "
        "next), or null (no ticket, or a `random` room before its start: the order is drawn "
        "at the start).",
    )
    opens_at: str | None = Field(
        default=None,
        description="With 409 `queue_not_open`: when the waiting room opens.",
        json_schema_extra=_TIME,
    )


class StatsOut(_Response):
    product_id: int
    total: int
    available: int
    held: int
    sold: int
    expired: int
    cancelled: int


class StatsTotalsOut(_Response):
    """Every product's units per state, added up."""

    products: int = Field(description="How many products there are.")
    total: int
    available: int
    held: int
    sold: int
    expired: int
    cancelled: int


class HealthOut(_Response):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class ConfigOut(_Response):
    max_quantity: int = Field(description="The most units one reservation may hold.")
    currency: str = Field(
        description="The ISO 4217 code of the currency prices are in (CURRENCY), e.g. EUR.",
        pattern="^[A-Z]{3}$",
    )
    hold_seconds: float = Field(description="How long a hold lasts before it expires.")
    queue_opens_seconds: float = Field(
        description="How long before a sale's start the waiting room of a product with a "
        "queue opens: a page can say when its line opens."
    )
    pass_seconds: float = Field(description="How long an admitted shopper's turn lasts.")
    server_time: str = Field(
        description="The server's clock when this was rendered.", json_schema_extra=_TIME
    )


# -- the shop's books (issue 12): ledger, reconciliation, webhooks, shop keys ---------------

ORDER_REFERENCE_PATTERN = "^[\\x20-\\x7e]{1,200}$"


class CompleteBody(_Request):
    """Optional body of a completion by the shop's backend."""

    order_reference: Annotated[
        StoredText,
        Field(
            min_length=1,
            max_length=200,
            pattern=ORDER_REFERENCE_PATTERN,
            description="The shop's own name for the order (printable ASCII): stored on the "
            "hold and sent in `reservation.completed`.",
        ),
    ]


class LedgerEntryOut(_Response):
    version: int = Field(description="The product's version after the change.")
    seq: int = Field(description="The movement's place among those of the same change.")
    movement: Literal[
        "created", "restocked", "reduced", "held", "completed", "cancelled", "expired"
    ]
    reservation_id: str | None
    units: int = Field(description="Units that moved.")
    available: int = Field(description="The product's available units right after.")
    held: int
    sold: int
    total: int
    actor: str = Field(description="`shopper`, `shopper:<id>`, `operator`, `shop` or `worker`.")
    at: str = Field(json_schema_extra=_TIME)


class LedgerPageOut(_Response):
    product_id: int
    entries: list[LedgerEntryOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class HistoryPointOut(_Response):
    at: str = Field(description="The start of the step.", json_schema_extra=_TIME)
    available: int = Field(description="Units available at the end of the step.")
    held: int
    sold: int
    total: int
    sold_in: int = Field(description="Units sold during the step.")


class SaleFiguresOut(_Response):
    started_at: str = Field(
        description="When the sale started (or starts): saleStartsAt, or the product's creation.",
        json_schema_extra=_TIME,
    )
    sell_through: float = Field(description="Units sold of the total stock, 0 to 1.")
    sold_out_at: str | None = Field(
        description="When the last unit sold, if every unit is sold.", json_schema_extra=_TIME
    )
    time_to_sell_out_seconds: float | None = Field(
        description="From the start of the sale to the last unit sold, if every unit is sold."
    )
    holds_converted: float | None = Field(
        description="Units bought of the units in holds that ended (bought, expired or "
        "cancelled), 0 to 1; null before any hold ended."
    )
    revenue: float = Field(
        description="What the sold units brought in, each at the price it sold at, in the "
        "shop's currency."
    )


class HistoryOut(_Response):
    product_id: int
    since: str = Field(json_schema_extra=_TIME)
    until: str = Field(json_schema_extra=_TIME)
    step_seconds: float = Field(description="The length of each point's step.")
    points: list[HistoryPointOut] = Field(
        description="One per step, oldest first: the units at the end of it, and what moved."
    )
    figures: SaleFiguresOut


class FiguresOut(_Response):
    available: int
    held: int
    sold: int
    total: int


class ReconciledOut(_Response):
    product_id: int
    ok: bool
    version: int = Field(description="The product's version the check reached.")
    product: FiguresOut = Field(description="The product row's units.")
    ledger: FiguresOut = Field(description="The units the ledger adds up to.")
    open_holds: int = Field(description="Units of the product's open (ACTIVE) holds.")
    rows_checked: int = Field(description="Ledger rows walked since the last proved balance.")
    problems: list[str] = Field(description="What does not add up, one sentence each.")


class ReconcileOut(_Response):
    ok: bool = Field(description="True when every product reconciles.")
    checked_at: str = Field(json_schema_extra=_TIME)
    unreconciled: list[int] = Field(description="The ids of the products that do not.")
    products: list[ReconciledOut]


EventType = Literal[
    "reservation.created",
    "reservation.completed",
    "reservation.cancelled",
    "reservation.expired",
    "product.sold_out",
    "product.back_in_stock",
    "product.restocked",
    "product.stock_reduced",
    "product.updated",
]


def _sendable_url(value: str) -> str:
    """A URL the worker's HTTP client can send to: it parses (`httpx.URL`, as the worker
    does), names a host, and its port (if any) is 1 to 65535. Raises ValueError otherwise.
    "http://[zz]/" or "http://xn--/" matched the pattern, was stored, and made every
    delivery run of the endpoint raise in the worker instead of failing."""
    try:
        url = httpx.URL(value)
        url.raw_host.decode("ascii")
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"is not a URL the worker can send to ({exc})") from None
    if not url.host:
        raise ValueError("names no host")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError("has a port outside 1 to 65535")
    return value


class CreateWebhookBody(_Request):
    url: Annotated[
        StoredText,
        Field(
            min_length=8,
            max_length=2000,
            pattern="^https?://[^\\s]+$",
            description="Where to POST the events: an http or https URL.",
        ),
        AfterValidator(_sendable_url),
    ]
    events: Annotated[
        list[EventType],
        Field(max_length=9, description="The event types to send; empty or absent: all."),
    ] = []
    description: Annotated[StoredText, Field(max_length=200)] = ""


class WebhookOut(_Response):
    id: int
    url: str
    description: str
    events: list[str] = Field(description="The event types it gets; empty: all.")
    enabled: bool
    disabled_reason: str | None = Field(
        description="Why it is off: the operator, or failing for WEBHOOK_RETRY_HOURS."
    )
    created_at: str = Field(json_schema_extra=_TIME)
    pending: int = Field(description="Deliveries waiting to go (or to be retried).")
    failing_since: str | None = Field(
        description="The first failure since the last success, if it is failing now.",
        json_schema_extra=_TIME,
    )


class WebhookSecretOut(WebhookOut):
    secret: str = Field(
        description="The signing secret (`whsec_…`), shown this once: keep it in the shop's "
        "configuration to verify our signatures."
    )


class DeliveryOut(_Response):
    event_id: str = Field(description="The webhook-id.")
    type: str
    product_id: int
    created_at: str = Field(json_schema_extra=_TIME)
    status: Literal["pending", "delivered", "redelivering"]
    attempts: int
    last_attempt_at: str | None = Field(json_schema_extra=_TIME)
    last_status: int | None = Field(description="The receiver's HTTP status, if it answered.")
    last_error: str | None
    delivered_at: str | None = Field(json_schema_extra=_TIME)


class CreateShopKeyBody(_Request):
    name: Annotated[StoredText, Field(min_length=1, max_length=100)]


class ShopKeyOut(_Response):
    id: int
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: str = Field(json_schema_extra=_TIME)
    revoked_at: str | None = Field(json_schema_extra=_TIME)


class ShopKeySecretOut(ShopKeyOut):
    key: str = Field(
        description="The key, shown this once: the shop's backend sends it as "
        "`Authorization: Bearer <key>`."
    )


# -- live frames over /ws (docs/design.md §6) -------------------------------------------------


class SnapshotFrame(_Response):
    type: Literal["snapshot"]
    server_time: str = Field(json_schema_extra=_TIME)
    products: list[ProductOut]


class StockFrame(_Response):
    type: Literal["stock"]
    product_id: int
    available_stock: int
    held_stock: int = Field(
        description="Units in active holds: not on sale now, but back on sale if their holds "
        "end unbought (a product with none available and some held is not sold out yet)."
    )
    version: int


class ProductFrame(_Response):
    type: Literal["product"]
    product: ProductOut
    reset: bool = Field(
        False,
        description="Present and true when the product was taken back from the database at "
        "a version far below the ones told before (the database was restored from a "
        "backup): take it whatever version you hold, and its frames from its version on.",
    )


class ReservationFrame(_Response):
    type: Literal["reservation"]
    reservation: ReservationOut


class TicketOut(_Response):
    """A shopper's ticket in a product's waiting room (issue 17)."""

    product_id: int
    state: Literal["waiting", "admitted", "reserved", "sold_out", "lapsed", "left"] = Field(
        description="`waiting` in line; `admitted`: a pass to reserve until `passExpiresAt`; "
        "`reserved`: the pass was used; `sold_out`: nothing left to sell, the sale ended, or "
        "the room was switched off (`message` says which); `lapsed`: the pass "
        "ran out unused; `left`: the shopper left the line."
    )
    position: int | None = Field(
        description="Place in line, 1 = next; null when not waiting, or in a `random` room "
        "before its start (the order is drawn at the start: shown then)."
    )
    ahead: int | None = Field(description="How many wait ahead (position − 1), or null.")
    waiting: int = Field(description="How many tickets wait in this room in all.")
    estimated_wait_seconds: int | None = Field(
        description="From the recent admission rate; null when there is none to go by, "
        "no unit is available (only held), or the passes out cover every unit available "
        "(nobody more is admitted until one lapses or units come back): "
        "`waitUnknownBecause` says which."
    )
    wait_unknown_because: Literal["not_started", "held", "passes_cover", "no_admissions"] | None = (
        Field(
            description="Why a `waiting` ticket has no `estimatedWaitSeconds`: `not_started`, "
            "turns start with the sale; `held`, no unit is available, only held (nobody is "
            "admitted until units come back); `passes_cover`, the passes out cover every unit "
            "available (the next is admitted when one lapses or units come back); "
            "`no_admissions`, nobody was admitted lately to go by. Null when there is an "
            "estimate, or the ticket is not waiting."
        )
    )
    pass_expires_at: str | None = Field(
        description="While `admitted`: reserve before this.", json_schema_extra=_TIME
    )
    joined_at: str = Field(json_schema_extra=_TIME)
    draw_at: str | None = Field(
        description="`random` rooms: the start, when the order of those who joined before it "
        "is shown (it was fixed at their joins by a secret key; nothing is drawn then).",
        json_schema_extra=_TIME,
    )
    held_units: int = Field(description="Units held by others now, which may come back.")
    message: str = Field(description="One sentence for the page.")
    server_time: str = Field(
        description="The server's clock when this was rendered.", json_schema_extra=_TIME
    )


class TicketFrame(_Response):
    type: Literal["ticket"]
    ticket: TicketOut


class QueueFrame(_Response):
    type: Literal["queue"]
    product_id: int
    waiting: int = Field(description="Tickets waiting in the product's room.")
    admitted: int = Field(description="Tickets holding a pass now.")


class QueueCountsOut(_Response):
    """A product's waiting room as every page sees it: what its `queue` frames carry, for
    the pages that poll (`GET /api/queues`: the rooms of the `ids` asked for, or a page of
    those someone is in)."""

    product_id: int
    waiting: int = Field(description="Tickets waiting in the product's room.")
    admitted: int = Field(description="Tickets holding a pass now.")


class RoomOut(_Response):
    """The console's figures for a product's waiting room."""

    product_id: int
    queue: QueueMode
    admit_factor: float
    waiting: int
    admitted: int
    reserved: int = Field(description="Passes used: tickets whose shopper reserved.")
    lapsed: int = Field(description="Passes that ran out unused.")
    sold_out: int
    left: int
    admitted_last_minute: int = Field(description="Admissions in the last 60 s.")
    opens_at: str | None = Field(json_schema_extra=_TIME)


class ErrorFrame(_Response):
    type: Literal["error"]
    code: Literal[
        "invalid_json",
        "unknown_message",
        "invalid_watch",
        "invalid_ids",
        "invalid_join",
        "no_shopper",
        "product_not_found",
        "queue_off",
        "queue_not_open",
        "rate_limited",
        "unavailable",
    ]
    message: str
    product_id: int | None = Field(
        default=None, description="With an error answering a `join`: the product it named."
    )


class JoinMessage(_Request):
    """Join the product's waiting room, as `POST /api/products/{id}/queue` does, over the
    socket the page already holds (no request of its own): answered with a `ticket` frame
    (the new ticket, or the one the shopper had), or an `error` frame with `productId`
    (`no_shopper`: the socket names no shopper, or the shop's token it was opened with
    has expired since; `product_not_found`, `queue_off`,
    `queue_not_open`, `rate_limited`, `unavailable`: the database could not be reached)."""

    type: Literal["join"]
    product_id: Annotated[int, Field(ge=1, le=2**31 - 1)]


# A join exactly as the shop's page sends it (`{"type":"join","productId":3}`, JSON's
# whitespace allowed between tokens, the keys in that order): JSON with no key named twice,
# a join by `JoinMessage`'s rules once its id is in range. Every other text goes through the
# general path (parse, the check for repeated keys, the model), which says what is wrong.
_WS = "[ \t\n\r]*"
_PLAIN_JOIN = re.compile(
    f'{_WS}\\{{{_WS}"type"{_WS}:{_WS}"join"{_WS},{_WS}"productId"{_WS}:{_WS}([1-9][0-9]{{0,9}})'
    f"{_WS}\\}}{_WS}"
)
MAX_ID = 2**31 - 1


def plain_join(text: str) -> int | None:
    """The product id of a join message written the page's way (`_PLAIN_JOIN`), or None
    for any other text (not necessarily wrong: parse it the general way). A join is the
    one message 10,000 pages send in a sale's first second; this spares each one two
    parses and a model's validation."""
    found = _PLAIN_JOIN.fullmatch(text)
    if found is None:
        return None
    product_id = int(found.group(1))
    return product_id if product_id <= MAX_ID else None


class WatchMessage(_Request):
    """Follow these holds; replaces the previous list."""

    type: Literal["watch"]
    reservations: Annotated[
        list[Annotated[StoredText, Field(max_length=RESERVATION_ID_CHARS)]], Field(max_length=50)
    ]


# -- views: what the responses and frames carry, as plain data -------------------------


def product_view(product: Product) -> dict[str, Any]:
    """A `ProductOut`."""
    starts = product.sale_starts_at
    return {
        "id": product.id,
        "name": product.name,
        "price": product.price_cents / 100,
        "availableStock": product.available_stock,
        "heldStock": product.held_units,
        "totalStock": product.total_stock,
        "version": product.version,
        "saleStartsAt": None if starts is None else iso(starts),
        "saleEndsAt": None if product.sale_ends_at is None else iso(product.sale_ends_at),
        "paused": product.paused_at is not None,
        "maxPerShopper": product.max_per_shopper,
        "queue": product.queue,
        "admitFactor": product.admit_factor,
    }


def reservation_view(
    reservation: Reservation, product: dict[str, Any], *, now: int
) -> dict[str, Any]:
    """A `ReservationOut`; `product` is the product's view."""
    view = _reservation_fields(reservation, now)
    view["product"] = product
    view["serverTime"] = iso(now)
    return view


def reservation_json(reservation: Reservation, product: bytes, *, now: int) -> bytes:
    """`reservation_view` as JSON, the same bytes, with `product`, the product's view, as
    JSON already (`Catalog.view_json`: encoded once per version, not in every answer)."""
    head = to_json(_reservation_fields(reservation, now))
    return b"".join(
        (head[:-1], b',"product":', product, b',"serverTime":', to_json(iso(now)), b"}")
    )


def _reservation_fields(reservation: Reservation, now: int) -> dict[str, Any]:
    """A `ReservationOut`'s fields but its last two (`product`, `serverTime`)."""
    completed = reservation.completed_at
    return {
        "id": reservation.id,
        "productId": reservation.product_id,
        "quantity": reservation.quantity,
        "status": reservation.effective_status(now),
        "createdAt": iso(reservation.created_at),
        "expiresAt": iso(reservation.expires_at),
        "completedAt": None if completed is None else iso(completed),
        "orderReference": reservation.order_reference,
        "cancelledBy": reservation.cancelled_by,
        "cancelReason": reservation.cancel_reason,
    }


def ticket_view(ticket: Ticket, product: Product, line: Lineup, *, now: int) -> dict[str, Any]:
    """A `TicketOut`: `ticket` with its place in `line` (the product's line, as last read)
    and the product's held units."""
    position = None
    state = ticket.state
    if state is TicketState.WAITING and not order_hidden(product, now):
        position = line.ahead_of(ticket.place) + 1
    wait = None
    rate = line.admissions_per_second()
    # No estimate while nothing is available: nobody is admitted until units come back,
    # whatever the last minute's rate was (the first in line was told 5 s while every unit
    # was held for two minutes more). Nor while the passes out cover every unit available:
    # the next is admitted only when one of them lapses or a unit comes back.
    passes_full = line.admitted >= passes_for(product)
    if position is not None and rate and product.available_stock > 0 and not passes_full:
        wait = math.ceil(position / rate)
    # Why a waiting ticket has no estimate, for the page to word (it re-derived the
    # admission rule, `passes_for`, to say so: the review's wrong-depth finding).
    because = None
    if state is TicketState.WAITING and wait is None:
        starts = product.sale_starts_at
        if position is None or (starts is not None and starts > now):
            because = "not_started"
        elif product.available_stock <= 0:
            because = "held"
        elif passes_full:
            because = "passes_cover"
        else:
            because = "no_admissions"
    draw_at = None
    if draws(product):
        assert product.sale_starts_at is not None
        draw_at = iso(product.sale_starts_at)
    return {
        "productId": ticket.product_id,
        "state": state.value,
        "position": position,
        "ahead": None if position is None else position - 1,
        # The line as last read (up to LINE_SECONDS old) may not hold this ticket yet: a
        # join's answer said "number 3 in line" with 2 waiting.
        "waiting": line.waiting if position is None else max(line.waiting, position),
        "estimatedWaitSeconds": wait,
        "waitUnknownBecause": because,
        "passExpiresAt": (
            None
            if ticket.pass_expires_at is None or state is not TicketState.ADMITTED
            else iso(ticket.pass_expires_at)
        ),
        "joinedAt": iso(ticket.joined_at),
        "drawAt": draw_at,
        "heldUnits": product.held_units,
        "message": _ticket_message(ticket, product, position, draw_at, now, passes_full),
        "serverTime": iso(now),
    }


def _ticket_message(
    ticket: Ticket,
    product: Product,
    position: int | None,
    draw_at: str | None,
    now: int,
    passes_full: bool,
) -> str:
    state = ticket.state
    if state is TicketState.ADMITTED:
        assert ticket.pass_expires_at is not None
        return f"It is your turn: reserve before {iso(ticket.pass_expires_at)}."
    if state is TicketState.RESERVED:
        return "You used your turn: your reservation is made."
    if state is TicketState.SOLD_OUT:
        if product.queue == "off":
            return "The waiting room has closed: the product is on sale without one now."
        if product.sale_state(now) == "ended":
            return "The sale has ended."  # the room closes with it, units left or not
        return "Sold out: every unit has been sold."
    if state is TicketState.LAPSED:
        return "Your turn passed without a reservation."
    if state is TicketState.LEFT:
        return "You left the waiting room."
    if position is None:
        return (
            "You are in the waiting room; the order is drawn at the start "
            f"({draw_at}): everyone who joins before then has the same chance."
        )
    text = f"You are number {position} in line."
    starts = product.sale_starts_at
    if starts is not None and starts > now:
        text += f" The sale starts at {iso(starts)}."
    elif product.available_stock <= 0 and product.held_units > 0:
        units = "1 unit is" if product.held_units == 1 else f"{product.held_units} units are"
        text += f" {units} held and may come back."
    elif product.available_stock > 0 and passes_full:
        text += (
            " Everyone ahead with a turn to reserve now covers the units left: you move up "
            "as their turns lapse or units come back."
        )
    return text
