"""The API's OpenAPI 3.1 document (`/api/openapi.json`) and its reference page (`/api/docs`).

The paths come from the app's own routes: each endpoint carries its description
(`@operation` from server/api/spec.py, next to the endpoint), and `build` walks the routes
and reads them back, so there is no second table to keep in step; a route without one is an
error. Every schema is generated from the models in server/wire/schemas.py, so the document
cannot describe one shape while the service sends another; the configured MAX_QUANTITY is
filled in from the settings. tests/test_openapi.py checks that every route the app serves is
in it, and runs schemathesis against the real service with it.

The document is built once per app, at the first request, and served as bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib.metadata import version

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from server.api import spec
from server.api.http import MAX_BODY_BYTES, json_response
from server.api.middleware import NEVER_REFUSED
from server.api.pages import SECURITY_HEADERS, STATIC, page_operation
from server.api.spec import (
    INVALID_REQUEST,
    NOT_FOUND,
    OVERLOADED,
    PAYLOAD_TOO_LARGE,
    REF,
    REQUEST_ID_PATTERN,
    RETRY_AFTER,
    UNAUTHORIZED,
    Operation,
    Schema,
    error,
    error_codes,
    header,
    json,
    operation,
    ref,
)
from server.service.idempotency import KEY_PATTERN as IDEMPOTENCY_KEY_PATTERN
from server.service.idempotency import MAX_KEY_LENGTH as MAX_IDEMPOTENCY_KEY
from server.wire import schemas

_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    schemas.ReserveBody,
    schemas.CreateProductBody,
    schemas.RestockBody,
    schemas.ReduceStockBody,
    schemas.UpdateProductBody,
    schemas.OperatorCancelBody,
    schemas.WatchMessage,
    schemas.JoinMessage,
    schemas.CompleteBody,
    schemas.CreateWebhookBody,
    schemas.CreateShopKeyBody,
)
_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    schemas.ProductOut,
    schemas.ReservationOut,
    schemas.ErrorOut,
    schemas.StatsOut,
    schemas.StatsTotalsOut,
    schemas.HealthOut,
    schemas.ConfigOut,
    schemas.MeOut,
    schemas.SnapshotFrame,
    schemas.StockFrame,
    schemas.ProductFrame,
    schemas.ReservationFrame,
    schemas.TicketFrame,
    schemas.QueueFrame,
    schemas.ErrorFrame,
    schemas.TicketOut,
    schemas.QueueCountsOut,
    schemas.RoomOut,
    schemas.LedgerPageOut,
    schemas.HistoryOut,
    schemas.ReconcileOut,
    schemas.WebhookOut,
    schemas.WebhookSecretOut,
    schemas.DeliveryOut,
    schemas.ShopKeyOut,
    schemas.ShopKeySecretOut,
)

DESCRIPTION = f"""\
Hold scarce units during a flash sale, then buy them, cancel, or let the hold expire.

JSON in and out, camelCase, times in ISO-8601 UTC with milliseconds and `Z`. Integers
must be written as JSON integers: `1`, not `1.0` (which JSON Schema's `integer` would
allow), nor `"1"` or `true`; unknown fields are refused. Each query parameter takes one
value (a list is one, comma-separated: `ids=3,8,9`): one sent twice is 400
`invalid_request` naming it. Every response carries the server's time in its `Date`
header and an `X-Request-ID` (yours, if you sent a sane one).

**Errors** all have one shape, `ErrorOut`: `{{"statusCode", "error", "code", "message",
"details"?, "stock"?}}`. `code` is stable, for programs; `message` is one human sentence;
`details` lists the fields at fault of a 400 `invalid_request`; `stock` is the product's
stock when a 409 `insufficient_stock` was decided. Any request may be answered 413
`{PAYLOAD_TOO_LARGE}` (a body over {MAX_BODY_BYTES // 1024} KiB) and, except health
and readiness, 503 `{OVERLOADED}` with `Retry-After` when the process has too many
requests in flight. A 500 is a bug. Below the application the HTTP server answers, in the
same shape, 400 `malformed` (not valid HTTP/1.1), 408 `header_timeout`/`body_timeout` (a
request head or body not sent within 10 s), 414 `url_too_long` and 431
`header_too_large`/`too_many_headers` (a head over 16 KiB or 100 headers), then closes the
connection (README, "Limits").

**Operator API** (`/api/admin/…`): only with `Authorization: Bearer <ADMIN_TOKEN>`. Without
a token configured it does not exist (404 `{NOT_FOUND}`); a missing or wrong token is 401
`{UNAUTHORIZED}`; after 10 wrong tokens in a minute from one client, every operator request
from it is 429 `too_many_failed_sign_ins` with `Retry-After`. A query parameter an
operator endpoint does not list is 400 `invalid_request`, naming it.

**Live updates** over `WS /ws` (a WebSocket, which OpenAPI cannot model; see `x-websocket`).
JSON text frames. On connect the server sends a `snapshot` of every product, then a
`stock` frame whenever a product's stock changes and a `product` frame when one is created
or restocked. `/ws?ids=3,8,9` (at most {schemas.MAX_PRODUCT_IDS} ids): only those products, in the
snapshot and after (ids that are not such a list, or `ids` sent twice: an `invalid_ids` error
frame and close 1008). A client that sends `{{"type": "watch", "reservations": [id, …]}}` (at most
50 ids; it replaces the previous list) gets a `reservation` frame with each hold's state at
once and whenever its status changes. A page whose shopper waits for a product's waiting
room may join it over its socket, `{{"type": "join", "productId": 3}}`: answered with the
`ticket` frame (or an `error` frame with `productId`), as `POST /api/products/{{id}}/queue`
would, without a request of its own. Keep the highest `version` per product and drop
older frames. A message not understood is answered with an `error` frame; close codes are
1008 (foreign `Origin`, or ten messages not understood), 1009 (a message over 4 KiB), 1013
(too many sockets here: try again) and 1001 (the server is going away). When the socket
cannot be used, poll `GET /api/products` with `If-None-Match` every 3 s.
"""


# -- the document -------------------------------------------------------------------------


def _components(max_quantity: int) -> Schema:
    _, top = models_json_schema(
        [(m, "validation") for m in _REQUEST_MODELS]
        + [(m, "serialization") for m in _RESPONSE_MODELS],
        ref_template=REF,
    )
    models: dict[str, Schema] = top["$defs"]
    # The limit is a setting; the model checks it through its validation context.
    models["ReserveBody"]["properties"]["quantity"]["maximum"] = max_quantity
    return {
        "schemas": models,
        "parameters": {
            "IdempotencyKey": {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Send the same key again (within a day) to get the first "
                "answer back instead of holding twice; the same key with a different body "
                "is 422.",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_IDEMPOTENCY_KEY,
                    "pattern": IDEMPOTENCY_KEY_PATTERN,
                },
            },
            "IfNoneMatch": {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "description": "The ETag of the listing you have: 304 if it is still current.",
                "schema": {"type": "string"},
            },
            "RequestId": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your id for this request, echoed back and logged; "
                "one is made up if you send none (or an unusable one).",
                "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
            },
        },
        "securitySchemes": {
            "operatorToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "The service's ADMIN_TOKEN.",
            }
        },
    }


class UndocumentedRoute(LookupError):
    """A route whose endpoint has no `@operation`: describe it next to the endpoint."""


class _Paths:
    """Collects operations, adding what every one of them shares."""

    def __init__(self, max_quantity: int) -> None:
        self.paths: dict[str, Schema] = {}
        self._max_quantity = max_quantity

    def add(self, method: str, path: str, described: Operation) -> None:
        # Copied: the building blocks in server/api/spec.py are shared between endpoints.
        responses = copy.deepcopy(dict(described.responses))
        responses.setdefault("413", error("The request body is over the limit", PAYLOAD_TOO_LARGE))
        if path not in NEVER_REFUSED:
            responses["503"] = _merge_503(responses.get("503"))
        if described.operator and not any(p.get("in") == "query" for p in described.parameters):
            responses["400"] = _merge_400(responses.get("400"))
        for status, response in responses.items():
            # The overload answer is given before a request id is assigned.
            request_id = header("This request's id.", {"type": "string"}, required=status != "503")
            response.setdefault("headers", {})["X-Request-ID"] = request_id
        operation: Schema = {
            "operationId": described.operation_id,
            "tags": [described.tag],
            "summary": described.summary,
            "parameters": [
                *copy.deepcopy(list(described.parameters)),
                {"$ref": "#/components/parameters/RequestId"},
            ],
            "responses": dict(sorted(responses.items())),
        }
        if described.description:
            operation["description"] = described.description.format(max_quantity=self._max_quantity)
        if described.body is not None:
            operation["requestBody"] = copy.deepcopy(described.body)
        if described.operator:
            operation["security"] = [{"operatorToken": []}]
        self.paths.setdefault(path, {})[method] = operation


def _merge_400(response: Schema | None) -> Schema:
    """400 `invalid_request` for a query parameter sent to an operator endpoint that takes
    none (server/api/admin.py: `operator_only`), plus whatever else it answers 400 for."""
    unknown = "a query parameter was sent: this endpoint takes none"
    if response is None:
        return error(unknown[:1].upper() + unknown[1:], INVALID_REQUEST)
    codes = error_codes(response)
    codes += [] if INVALID_REQUEST in codes else [INVALID_REQUEST]
    said = response["description"].rsplit(" (`code`", 1)[0]
    return error(f"{said}; or {unknown}", *codes, headers=response.get("headers"))


def _merge_503(response: Schema | None) -> Schema:
    """503 `overloaded`, plus whatever else the route answers 503 for."""
    codes = [OVERLOADED]
    if response is not None:
        codes += error_codes(response)
    return error(
        "Too busy, or the database is unavailable: nothing was changed; try again",
        *codes,
        headers={"Retry-After": RETRY_AFTER},
    )


def _operations(route: BaseRoute) -> list[tuple[str, str, object]]:
    """(method, path, the endpoint that describes it) for each operation a route serves."""
    if isinstance(route, Route):
        if not route.include_in_schema:
            return []  # the shopper API at the root: the description says so, once
        # HEAD comes with every GET, by Starlette; it is not an operation of its own.
        methods = sorted(m for m in (route.methods or {"GET"}) if m != "HEAD")
        return [(method.lower(), route.path, route.endpoint) for method in methods]
    if isinstance(route, Mount):
        return [("get", route.path + "/{path}", route.app)]
    if isinstance(route, WebSocketRoute):
        return []  # `x-websocket`, below: OpenAPI cannot model a WebSocket
    raise UndocumentedRoute(f"a route of a kind the document does not know: {route!r}")


def build(routes: Sequence[BaseRoute], max_quantity: int) -> Schema:
    """The whole document, for an app with `routes` whose MAX_QUANTITY is `max_quantity`."""
    paths = _Paths(max_quantity)
    for route in routes:
        for method, path, endpoint in _operations(route):
            described = spec.described(endpoint)
            if described is None:
                raise UndocumentedRoute(
                    f"{method.upper()} {path} has no @operation: describe it next to its "
                    "endpoint (server/api/spec.py)"
                )
            paths.add(method, path, described)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "Flash-sale stock reservations",
            "version": version("flashsale"),
            "description": DESCRIPTION,
        },
        "tags": [
            {"name": "Shop", "description": "Products, for shoppers."},
            {"name": "Reservations", "description": "Holds: make one, buy it or cancel it."},
            {
                "name": "Waiting room",
                "description": "A product's line: join it, read your ticket, leave it.",
            },
            {"name": "Operator", "description": "Needs `Authorization: Bearer <ADMIN_TOKEN>`."},
            {"name": "Service", "description": "Health, readiness, this document."},
            {"name": "Pages", "description": "HTML pages and their files."},
        ],
        "paths": paths.paths,
        "components": _components(max_quantity),
        "x-websocket": _websocket(),
    }


def _websocket() -> Schema:
    return {
        "path": "/ws",
        "summary": "Live stock and hold updates: JSON text frames (see the description).",
        "serverMessages": [
            ref(m)
            for m in (
                schemas.SnapshotFrame,
                schemas.StockFrame,
                schemas.ProductFrame,
                schemas.ReservationFrame,
                schemas.TicketFrame,
                schemas.QueueFrame,
                schemas.ErrorFrame,
            )
        ],
        "clientMessages": [ref(schemas.WatchMessage), ref(schemas.JoinMessage)],
        "closeCodes": {
            "1001": "The server is going away: reconnect.",
            "1008": "A foreign Origin, ten messages not understood, or invalid `ids`.",
            "1009": "A message over 4 KiB.",
            "1013": "Too many sockets on this process: try again later.",
        },
    }


def document(app: Starlette) -> bytes:
    """The document of `app` (its routes, its settings' MAX_QUANTITY), as JSON bytes."""
    return to_json(build(app.routes, app.state.settings.max_quantity))


# -- the endpoints ------------------------------------------------------------------------


@operation(
    "openapi",
    "Service",
    "This document",
    {"200": json({"type": "object"}, "The OpenAPI 3.1 document")},
)
async def openapi_json(request: Request) -> Response:
    app: Starlette = request.app
    built: bytes | None = getattr(app.state, "openapi_document", None)
    if built is None:
        built = app.state.openapi_document = document(app)
    return json_response(built)


@page_operation("referencePage", "This API's reference, rendered from this document")
async def reference_page(request: Request) -> Response:
    return FileResponse(STATIC / "api.html", headers=SECURITY_HEADERS)


routes = [
    Route("/api/openapi.json", openapi_json, methods=["GET"]),
    Route("/api/docs", reference_page, methods=["GET"]),
]
