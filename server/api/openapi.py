"""The API's OpenAPI 3.1 document (`/api/openapi.json`) and its reference page (`/api/docs`).

Every schema in the document is generated from the models in server/wire/schemas.py, so the
document cannot describe one shape while the service sends another; what pydantic cannot
know (the configured MAX_QUANTITY, which errors each route can answer, the headers) is
declared here, next to the routes it describes. tests/test_openapi.py checks that every
route the app serves is in it, and runs schemathesis against the real service with it.

The document is built once per process, at the first request, and served as bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import to_json
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from server.api.admin import ReservationQuery
from server.api.http import MAX_BODY_BYTES, json_response
from server.api.middleware import NEVER_REFUSED
from server.api.pages import SECURITY_HEADERS, STATIC
from server.api.shop import MAX_IDEMPOTENCY_KEY
from server.domain import errors
from server.wire import schemas

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
# What server.domain.inventory.is_reservation_id accepts: 22 characters of URL-safe base64.
RESERVATION_ID_PATTERN = "^[A-Za-z0-9_-]{22}$"
# Printable ASCII, without the spaces at either end that HTTP would strip.
IDEMPOTENCY_KEY_PATTERN = "^[!-~]([ -~]*[!-~])?$"
REQUEST_ID_PATTERN = "^[A-Za-z0-9._:-]{1,64}$"

_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    schemas.ReserveBody,
    schemas.CreateProductBody,
    schemas.RestockBody,
    schemas.WatchMessage,
)
_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    schemas.ProductOut,
    schemas.ReservationOut,
    schemas.ErrorOut,
    schemas.StatsOut,
    schemas.HealthOut,
    schemas.ConfigOut,
    schemas.SnapshotFrame,
    schemas.StockFrame,
    schemas.ProductFrame,
    schemas.ReservationFrame,
    schemas.ErrorFrame,
)

# Error codes that are not a DomainError class of their own (see server/api/http.py).
INVALID_REQUEST = "invalid_request"
INVALID_JSON = "invalid_json"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
PAYLOAD_TOO_LARGE = "payload_too_large"
RATE_LIMITED = "rate_limited"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
OVERLOADED = "overloaded"
DATABASE = (errors.DatabaseBusy.code, errors.DatabaseUnavailable.code)

DESCRIPTION = f"""\
Hold scarce units during a flash sale, then buy them, cancel, or let the hold expire.

JSON in and out, camelCase, times in ISO-8601 UTC with milliseconds and `Z`. Integers
must be written as JSON integers: `1`, not `1.0` (which JSON Schema's `integer` would
allow), nor `"1"` or `true`; unknown fields are refused. Every
response carries the server's time in its `Date` header and an `X-Request-ID` (yours, if
you sent a sane one).

**Errors** all have one shape, `ErrorOut`: `{{"statusCode", "error", "code", "message",
"details"?, "stock"?}}`. `code` is stable, for programs; `message` is one human sentence;
`details` lists the fields at fault of a 400 `invalid_request`; `stock` is the product's
stock when a 409 `insufficient_stock` was decided. Any request may be answered 413
`{PAYLOAD_TOO_LARGE}` (a body over {MAX_BODY_BYTES // 1024} KiB) and, except health,
readiness and metrics, 503 `{OVERLOADED}` with `Retry-After` when the process has too many
requests in flight. A 500 is a bug.

**Operator API** (`/api/admin/…`): only with `Authorization: Bearer <ADMIN_TOKEN>`. Without
a token configured it does not exist (404 `{NOT_FOUND}`); a missing or wrong token is 401
`{UNAUTHORIZED}`.

**Live updates** over `WS /ws` (a WebSocket, which OpenAPI cannot model; see `x-websocket`).
JSON text frames. On connect the server sends a `snapshot` of every product, then a
`stock` frame whenever a product's stock changes and a `product` frame when one is created
or restocked. A client that sends `{{"type": "watch", "reservations": [id, …]}}` (at most
50 ids; it replaces the previous list) gets a `reservation` frame with each hold's state at
once and whenever its status changes. Keep the highest `version` per product and drop
older frames. A message not understood is answered with an `error` frame; close codes are
1008 (foreign `Origin`, or ten messages not understood), 1009 (a message over 4 KiB), 1013
(too many sockets here: try again) and 1001 (the server is going away). When the socket
cannot be used, poll `GET /api/products` with `If-None-Match` every 3 s.
"""


# -- the building blocks ------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> Schema:
    return {"$ref": REF.format(model=model.__name__)}


def _array(model: type[BaseModel]) -> Schema:
    return {"type": "array", "items": _ref(model)}


def _header(description: str, schema: Schema | None = None, *, required: bool = True) -> Schema:
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


ETAG = _header("The listing's version: send it back in If-None-Match.")
RETRY_AFTER = _header("Seconds to wait before trying again.", {"type": "integer", "minimum": 0})
CACHE_CONTROL = _header("`no-cache`: revalidate with If-None-Match.")


def _json(schema: Schema, description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, *codes: str, headers: dict[str, Schema] | None = None) -> Schema:
    """An `ErrorOut` whose `code` is one of `codes`."""
    schema = {"allOf": [_ref(schemas.ErrorOut), {"properties": {"code": {"enum": list(codes)}}}]}
    listed = ", ".join(f"`{code}`" for code in codes)
    return _json(schema, f"{description} (`code`: {listed})", headers)


def _body(model: type[BaseModel]) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _query_parameters(model: type[BaseModel]) -> list[Schema]:
    """One query parameter per field of `model`; an absent one is its default, so the
    `null` a model allows for "not given" has no place in a query string."""
    schema = model.model_json_schema(ref_template=REF)
    parameters = []
    for name, field in schema["properties"].items():
        field = {k: v for k, v in field.items() if k != "title"}
        branches = [b for b in field.pop("anyOf", []) if b != {"type": "null"}]
        if len(branches) == 1:
            field.update(branches[0])
        if field.get("default", ...) is None:
            del field["default"]
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", ()),
                "schema": field,
            }
        )
    return parameters


def _path_parameter(name: str, description: str, schema: Schema) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


PRODUCT_ID = _path_parameter(
    "product_id",
    "A product's id. Anything else (not a positive 32-bit integer) is answered 404.",
    {"type": "integer", "minimum": 1, "maximum": schemas.MAX_INT32},
)
RESERVATION_ID = _path_parameter(
    "reservation_id",
    "A reservation's id. A malformed id is answered 404 like an unknown one.",
    {"type": "string", "pattern": RESERVATION_ID_PATTERN},
)


# -- the document -------------------------------------------------------------------------


def _components(max_quantity: int, idempotency_key_max: int) -> Schema:
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
                    "maxLength": idempotency_key_max,
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


class _Paths:
    """Collects operations, adding what every one of them shares."""

    def __init__(self) -> None:
        self.paths: dict[str, Schema] = {}

    def add(
        self,
        method: str,
        path: str,
        operation_id: str,
        tag: str,
        summary: str,
        responses: dict[str, Schema],
        *,
        parameters: Sequence[Schema] = (),
        body: Schema | None = None,
        operator: bool = False,
        description: str | None = None,
    ) -> None:
        responses = dict(responses)
        responses.setdefault("413", _error("The request body is over the limit", PAYLOAD_TOO_LARGE))
        if path not in NEVER_REFUSED:
            responses["503"] = _merge_503(responses.get("503"))
        for status, response in responses.items():
            # The overload answer is given before a request id is assigned.
            request_id = _header("This request's id.", {"type": "string"}, required=status != "503")
            response.setdefault("headers", {})["X-Request-ID"] = request_id
        operation: Schema = {
            "operationId": operation_id,
            "tags": [tag],
            "summary": summary,
            "parameters": [*parameters, {"$ref": "#/components/parameters/RequestId"}],
            "responses": dict(sorted(responses.items())),
        }
        if description:
            operation["description"] = description
        if body is not None:
            operation["requestBody"] = body
        if operator:
            operation["security"] = [{"operatorToken": []}]
        self.paths.setdefault(path, {})[method] = operation


def _merge_503(response: Schema | None) -> Schema:
    """503 `overloaded`, plus whatever else the route answers 503 for."""
    codes = [OVERLOADED]
    if response is not None:
        schema = response["content"]["application/json"]["schema"]
        codes += schema["allOf"][1]["properties"]["code"]["enum"]
    return _error(
        "Too busy, or the database is unavailable: nothing was changed; try again",
        *codes,
        headers={"Retry-After": RETRY_AFTER},
    )


def build(max_quantity: int) -> Schema:
    """The whole document, for a service whose MAX_QUANTITY is `max_quantity`."""
    database = _error("The database is busy or unreachable", *DATABASE)
    invalid = _error(
        "The body (or a header) is invalid: `details` says which field and why",
        INVALID_REQUEST,
        INVALID_JSON,
    )
    not_json = _error("The body is not sent as application/json", UNSUPPORTED_MEDIA_TYPE)
    no_product = _error("There is no such product", errors.ProductNotFound.code)
    no_reservation = _error("There is no such reservation", errors.ReservationNotFound.code)
    unauthorized = _error("The operator token is missing or wrong", UNAUTHORIZED)
    no_operator_api = _error("No operator token is configured: there is no operator API", NOT_FOUND)
    product_or_no_api = _error(
        "There is no such product, or no operator API",
        errors.ProductNotFound.code,
        NOT_FOUND,
    )
    reservation = _json(_ref(schemas.ReservationOut), "The reservation")
    product = _json(_ref(schemas.ProductOut), "The product")
    html = {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
    page_headers = {name: _header(f"`{value}`") for name, value in SECURITY_HEADERS.items()}

    p = _Paths()
    # -- shop
    p.add(
        "get",
        "/api/products",
        "listProducts",
        "Shop",
        "Every product, by id",
        {
            "200": _json(
                _array(schemas.ProductOut),
                "The products, by id",
                {"ETag": ETAG, "Cache-Control": CACHE_CONTROL},
            ),
            "304": {
                "description": "Not modified: the ETag sent in If-None-Match is current",
                "headers": {"ETag": ETAG, "Cache-Control": CACHE_CONTROL},
            },
        },
        parameters=[{"$ref": "#/components/parameters/IfNoneMatch"}],
        description="Costs no query: the listing is kept current in the process. Poll it "
        "with If-None-Match when the WebSocket cannot be used.",
    )
    p.add(
        "get",
        "/api/products/{product_id}",
        "getProduct",
        "Shop",
        "One product",
        {"200": product, "404": no_product, "503": database},
        parameters=[PRODUCT_ID],
    )
    p.add(
        "post",
        "/api/reservations",
        "createReservation",
        "Reservations",
        "Hold units of a product",
        {
            "201": _json(
                _ref(schemas.ReservationOut),
                "The hold, ACTIVE until `expiresAt`",
                {
                    "Idempotent-Replayed": _header(
                        "`true` when this is the answer to an earlier request with the "
                        "same Idempotency-Key.",
                        {"type": "string", "enum": ["true"]},
                        required=False,
                    )
                },
            ),
            "400": invalid,
            "404": no_product,
            "409": _error(
                "Not enough units left (`stock` in the body: the product's stock now), or "
                "the sale has not started",
                errors.InsufficientStock.code,
                errors.SaleNotStarted.code,
            ),
            "415": not_json,
            "422": _error(
                "The Idempotency-Key was used for a different request",
                errors.IdempotencyKeyReused.code,
            ),
            "429": _error(
                "Too many reservations from this client (RESERVE_RATE_LIMIT)",
                RATE_LIMITED,
                headers={"Retry-After": RETRY_AFTER},
            ),
            "503": database,
        },
        parameters=[{"$ref": "#/components/parameters/IdempotencyKey"}],
        body=_body(schemas.ReserveBody),
        description=f"`quantity` is from 1 to MAX_QUANTITY (here {max_quantity}). Integers "
        'must be JSON integers (not 1.0, 1.5, "2" or true); unknown fields are refused.',
    )
    p.add(
        "get",
        "/api/reservations/{reservation_id}",
        "getReservation",
        "Reservations",
        "A hold's current state",
        {"200": reservation, "404": no_reservation, "503": database},
        parameters=[RESERVATION_ID],
    )
    p.add(
        "post",
        "/api/reservations/{reservation_id}/complete",
        "completeReservation",
        "Reservations",
        "Buy the held units (idempotent)",
        {
            "200": _json(
                _ref(schemas.ReservationOut), "The reservation, COMPLETED (again: unchanged)"
            ),
            "404": no_reservation,
            "409": _error(
                "The hold expired or was cancelled",
                errors.ReservationExpired.code,
                errors.ReservationCancelled.code,
            ),
            "503": database,
        },
        parameters=[RESERVATION_ID],
    )
    p.add(
        "post",
        "/api/reservations/{reservation_id}/cancel",
        "cancelReservation",
        "Reservations",
        "Give the held units back (idempotent)",
        {
            "200": _json(
                _ref(schemas.ReservationOut), "The reservation, CANCELLED (again: unchanged)"
            ),
            "404": no_reservation,
            "409": _error(
                "The hold was already bought, or expired",
                errors.ReservationCompleted.code,
                errors.ReservationExpired.code,
            ),
            "503": database,
        },
        parameters=[RESERVATION_ID],
    )
    p.add(
        "get",
        "/api/config",
        "getConfig",
        "Shop",
        "The limits a page needs, and the server's time",
        {"200": _json(_ref(schemas.ConfigOut), "The limits")},
    )
    # -- operators
    p.add(
        "post",
        "/api/admin/products",
        "createProduct",
        "Operator",
        "Create a product",
        {
            "201": _json(_ref(schemas.ProductOut), "The new product"),
            "400": invalid,
            "401": unauthorized,
            "404": no_operator_api,
            "415": not_json,
            "503": database,
        },
        body=_body(schemas.CreateProductBody),
        operator=True,
    )
    p.add(
        "post",
        "/api/admin/products/{product_id}/restock",
        "restockProduct",
        "Operator",
        "Add units to a product's stock",
        {
            "200": product,
            "400": invalid,
            "401": unauthorized,
            "404": product_or_no_api,
            "415": not_json,
            "503": database,
        },
        parameters=[PRODUCT_ID],
        body=_body(schemas.RestockBody),
        operator=True,
    )
    p.add(
        "get",
        "/api/admin/products/{product_id}/stats",
        "getProductStats",
        "Operator",
        "One product's units per state",
        {
            "200": _json(_ref(schemas.StatsOut), "Units per state"),
            "401": unauthorized,
            "404": product_or_no_api,
            "503": database,
        },
        parameters=[PRODUCT_ID],
        operator=True,
    )
    p.add(
        "get",
        "/api/admin/stats",
        "listStats",
        "Operator",
        "Every product's units per state",
        {
            "200": _json(_array(schemas.StatsOut), "Units per state, by product"),
            "401": unauthorized,
            "404": no_operator_api,
            "503": database,
        },
        operator=True,
    )
    p.add(
        "get",
        "/api/admin/reservations",
        "listReservations",
        "Operator",
        "Reservations, newest first",
        {
            "200": _json(_array(schemas.ReservationOut), "The reservations, newest first"),
            "400": _error("A query parameter is invalid or unknown", INVALID_REQUEST),
            "401": unauthorized,
            "404": no_operator_api,
            "503": database,
        },
        parameters=_query_parameters(ReservationQuery),
        operator=True,
    )
    # -- the service itself
    p.add(
        "get",
        "/healthz",
        "health",
        "Service",
        "The process is up",
        {"200": _json(_ref(schemas.HealthOut), "Up")},
    )
    p.add(
        "get",
        "/readyz",
        "readiness",
        "Service",
        "The database and Redis both answer, each within a second",
        {
            "200": _json(_ref(schemas.HealthOut), "Ready"),
            "503": _json(
                _ref(schemas.HealthOut),
                "Not ready: `checks` says which one failed",
                {"Retry-After": RETRY_AFTER},
            ),
        },
    )
    p.add(
        "get",
        "/metrics",
        "metrics",
        "Service",
        "Prometheus metrics, added up over the web processes",
        {
            "200": {
                "description": "Prometheus' text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    p.add(
        "get",
        "/api/openapi.json",
        "openapi",
        "Service",
        "This document",
        {"200": _json({"type": "object"}, "The OpenAPI 3.1 document")},
    )
    # -- pages
    for path, operation_id, summary in (
        ("/", "shopPage", "The shop"),
        ("/admin", "operatorPage", "The operator console"),
        ("/api/docs", "referencePage", "This API's reference, rendered from this document"),
    ):
        page = {**html, "headers": dict(page_headers)}
        p.add("get", path, operation_id, "Pages", summary, {"200": page})
    p.add(
        "get",
        "/static/{path}",
        "staticFile",
        "Pages",
        "The pages' files: scripts, styles, images",
        {
            "200": {"description": "The file", "content": {"*/*": {}}},
            "404": _error("There is no such file", NOT_FOUND),
        },
        parameters=[_path_parameter("path", "The file's path under static/.", {"type": "string"})],
    )

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
            {"name": "Operator", "description": "Needs `Authorization: Bearer <ADMIN_TOKEN>`."},
            {"name": "Service", "description": "Health, readiness, metrics, this document."},
            {"name": "Pages", "description": "HTML pages and their files."},
        ],
        "paths": p.paths,
        "components": _components(max_quantity, MAX_IDEMPOTENCY_KEY),
        "x-websocket": _websocket(),
    }


def _websocket() -> Schema:
    return {
        "path": "/ws",
        "summary": "Live stock and hold updates: JSON text frames (see the description).",
        "serverMessages": [
            _ref(m)
            for m in (
                schemas.SnapshotFrame,
                schemas.StockFrame,
                schemas.ProductFrame,
                schemas.ReservationFrame,
                schemas.ErrorFrame,
            )
        ],
        "clientMessages": [_ref(schemas.WatchMessage)],
        "closeCodes": {
            "1001": "The server is going away: reconnect.",
            "1008": "A foreign Origin, or ten messages not understood.",
            "1009": "A message over 4 KiB.",
            "1013": "Too many sockets on this process: try again later.",
        },
    }


@functools.cache
def document(max_quantity: int) -> bytes:
    return to_json(build(max_quantity))


# -- the endpoints ------------------------------------------------------------------------


async def openapi_json(request: Request) -> Response:
    return json_response(document(request.app.state.settings.max_quantity))


async def reference_page(request: Request) -> Response:
    return FileResponse(STATIC / "api.html", headers=SECURITY_HEADERS)


routes = [
    Route("/api/openapi.json", openapi_json, methods=["GET"]),
    Route("/api/docs", reference_page, methods=["GET"]),
]
