"""The operator's view of the books: a product's stock ledger, and the reconciliation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.admin import operator_only
from server.api.http import PRODUCT_PATH_ID, RequestError, json_response, parse_params
from server.api.spec import (
    DATABASE,
    INVALID_REQUEST,
    NO_OPERATOR_API,
    OPERATOR_AUTH,
    PRODUCT_ID,
    PRODUCT_OR_NO_OPERATOR_API,
    error,
    json,
    operation,
    query_parameters,
    ref,
)
from server.domain import clock
from server.domain.clock import iso, now_ms
from server.domain.ledger import Entry, Figures, Reconciled
from server.service.ledger import Ledger
from server.wire import schemas

CURSOR_PATTERN = r"^\d{1,18}\.\d{1,9}$"


def ledger_of(request: Request) -> Ledger:
    found: Ledger = request.app.state.ledger
    return found


class LedgerQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    limit: Annotated[int, Field(ge=1, le=1000, description="Entries per page.")] = 100
    cursor: Annotated[
        schemas.StoredText | None,
        Field(
            max_length=28,
            pattern=CURSOR_PATTERN,
            description="`nextCursor` of the previous page: the entries older than it.",
        ),
    ] = None
    since: Annotated[
        AwareDatetime | None, Field(description="Only movements at or after this time.")
    ] = None
    until: Annotated[
        AwareDatetime | None, Field(description="Only movements before this time.")
    ] = None


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else clock.ms(moment)


@operation(
    "getProductLedger",
    "Operator",
    "A product's stock movements, newest first",
    {
        "200": json(ref(schemas.LedgerPageOut), "A page of the product's ledger"),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        **OPERATOR_AUTH,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID, *query_parameters(LedgerQuery)],
    operator=True,
    description="One entry per movement (created, restocked, held, completed, cancelled, "
    "expired), with the product's units right after it and who moved it. Page with "
    "`cursor`; `since`/`until` limit the entries to a time range (a chart of the stock over "
    "a sale reads its range newest first, page by page).",
)
@operator_only
async def product_ledger(request: Request) -> Response:
    query = parse_params(request.query_params, LedgerQuery)
    product_id = PRODUCT_PATH_ID.id(request)
    before = None
    if query.cursor is not None:
        version, _, seq = query.cursor.partition(".")
        before = (int(version), int(seq))
    found = await ledger_of(request).entries(
        product_id,
        limit=query.limit,
        before=before,
        since=_ms(query.since),
        until=_ms(query.until),
    )
    if found is None:
        raise PRODUCT_PATH_ID.not_found(request)
    last = found[-1] if len(found) == query.limit else None
    return json_response(
        {
            "productId": product_id,
            "entries": [_entry_view(e) for e in found],
            "nextCursor": None if last is None else f"{last.version}.{last.seq}",
        }
    )


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    since: Annotated[
        AwareDatetime | None,
        Field(description="From this time; default: the start of the sale (at most 92 days)."),
    ] = None
    until: Annotated[AwareDatetime | None, Field(description="Until this time; default: now.")] = (
        None
    )


@operation(
    "getProductHistory",
    "Operator",
    "A product's stock over time, and its sale's figures",
    {
        "200": json(ref(schemas.HistoryOut), "The product's units per step, oldest first"),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        **OPERATOR_AUTH,
        "404": PRODUCT_OR_NO_OPERATOR_API,
        "503": DATABASE,
    },
    parameters=[PRODUCT_ID, *query_parameters(HistoryQuery)],
    operator=True,
    description="Read from the stock ledger, so it covers the whole sale whenever the "
    "console is opened (as long as RETENTION_DAYS keeps the rows). The step is the finest "
    "of 1 s, 2 s, 5 s … 1 day that draws the range in at most 600 points: per second over a "
    "sale's first ten minutes, coarser over longer ranges. The cost is the number of points "
    "(one index seek each), not the movements in the range nor the history before it. `figures`: "
    "sell-through, time to sell out, holds converted to purchases, revenue.",
)
@operator_only
async def product_history(request: Request) -> Response:
    query = parse_params(request.query_params, HistoryQuery)
    product_id = PRODUCT_PATH_ID.id(request)
    until = _ms(query.until) or now_ms()
    try:
        found = await ledger_of(request).history(product_id, since=_ms(query.since), until=until)
    except ValueError as exc:
        raise RequestError(400, INVALID_REQUEST, f"{exc}.") from None
    if found is None:
        raise PRODUCT_PATH_ID.not_found(request)
    s = found.stats
    ended = s.sold + s.expired + s.cancelled
    sold_out = found.sold_out_at
    return json_response(
        {
            "productId": product_id,
            "since": iso(found.since),
            "until": iso(found.until),
            "stepSeconds": found.step / 1000,
            "points": [
                {
                    "at": iso(p.at),
                    **_figures(p.figures),
                    "soldIn": p.sold,
                }
                for p in found.points
            ],
            "figures": {
                "startedAt": iso(found.started),
                "sellThrough": s.sold / s.total if s.total else 0.0,
                "soldOutAt": None if sold_out is None else iso(sold_out),
                "timeToSellOutSeconds": (
                    None if sold_out is None else max(sold_out - found.started, 0) / 1000
                ),
                "holdsConverted": s.sold / ended if ended else None,
                "revenue": s.revenue_cents / 100,
            },
        }
    )


@operation(
    "reconcile",
    "Operator",
    "Prove that every product's ledger adds up",
    {
        "200": json(
            ref(schemas.ReconcileOut),
            "Per product: whether its ledger adds up to its units and its open holds",
        ),
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    operator=True,
    description="Reads one consistent snapshot and changes nothing. For each product: each "
    "ledger row since the last proved balance is the row before plus its movement, the last "
    "one equals the product's units, and the open holds hold exactly the held units. "
    "`unreconciled` names every product where something does not add up; `problems` says "
    "what.",
)
@operator_only
async def reconcile(request: Request) -> Response:
    result = await ledger_of(request).reconcile()
    return json_response(
        {
            "ok": result.ok,
            "checkedAt": iso(result.at),
            "unreconciled": [p.product_id for p in result.unreconciled],
            "products": [_reconciled_view(p) for p in result.products],
        }
    )


def _figures(f: Figures) -> dict[str, int]:
    return {"available": f.available, "held": f.held, "sold": f.sold, "total": f.total}


def _entry_view(e: Entry) -> dict[str, object]:
    return {
        "version": e.version,
        "seq": e.seq,
        "movement": e.kind,
        "reservationId": e.reservation_id,
        "units": e.units,
        **_figures(e.figures),
        "actor": e.actor,
        "at": iso(e.at),
    }


def _reconciled_view(p: Reconciled) -> dict[str, object]:
    return {
        "productId": p.product_id,
        "ok": p.ok,
        "version": p.version,
        "product": _figures(p.product),
        "ledger": _figures(p.ledger),
        "openHolds": p.open_holds,
        "rowsChecked": p.rows_checked,
        "problems": p.problems,
    }


routes = [
    Route("/api/admin/products/{product_id}/ledger", product_ledger, methods=["GET"]),
    Route("/api/admin/products/{product_id}/history", product_history, methods=["GET"]),
    Route("/api/admin/reconcile", reconcile, methods=["GET"]),
]
