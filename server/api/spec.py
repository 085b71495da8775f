"""How an endpoint describes itself in the OpenAPI document: `@operation(...)`, next to it.

Each route module decorates its endpoints with what pydantic cannot know about them: the
operation's id, tag and summary, the statuses and error codes it answers, its parameters
and body. `server.api.openapi` walks the app's routes and reads these back, so a new
endpoint is described in one place, where it is written; a route without a description
fails the document's build (and tests/test_openapi.py). Shapes are never retyped here:
bodies and responses refer to the models of `server.wire.schemas` (`ref`, `json_body`).

The building blocks below (`json`, `error`, `header`, the shared parameters and answers)
are plain JSON Schema / OpenAPI fragments; the document copies them, so sharing one between
operations is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from server.domain import errors
from server.wire import schemas

Schema = dict[str, Any]
Described = TypeVar("Described")

REF = "#/components/schemas/{model}"
# What server.domain.inventory.is_reservation_id accepts: 30 characters of URL-safe base64
# (22: an id made before the time went first).
RESERVATION_ID_PATTERN = "^[A-Za-z0-9_-]{22}([A-Za-z0-9_-]{8})?$"
REQUEST_ID_PATTERN = "^[A-Za-z0-9._:-]{1,64}$"

# Error codes that are not a DomainError class of their own (see server/api/http.py).
INVALID_REQUEST = "invalid_request"
INVALID_JSON = "invalid_json"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
PAYLOAD_TOO_LARGE = "payload_too_large"
RATE_LIMITED = "rate_limited"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
OVERLOADED = "overloaded"
DATABASE_BUSY = "database_busy"
DATABASE_UNAVAILABLE = "database_unavailable"
SHOP_KEY_NOT_ALLOWED = "shop_key_not_allowed"


# -- an endpoint's description ------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One endpoint, as the document describes it.

    `responses` maps a status ("200", "404") to an OpenAPI response; every operation also
    gets 413 and, unless it is never refused, 503 `overloaded` (added by the document).
    `description` may name `{max_quantity}`, filled in from the settings.
    """

    operation_id: str
    tag: str
    summary: str
    responses: Mapping[str, Schema]
    parameters: Sequence[Schema] = ()
    body: Schema | None = None
    operator: bool = False
    description: str | None = None


_ATTRIBUTE = "__openapi_operation__"


def operation(
    operation_id: str,
    tag: str,
    summary: str,
    responses: Mapping[str, Schema],
    *,
    parameters: Sequence[Schema] = (),
    body: Schema | None = None,
    operator: bool = False,
    description: str | None = None,
) -> Callable[[Described], Described]:
    """Attach an `Operation` to an endpoint (a function, or an ASGI app that is mounted)."""
    described = Operation(
        operation_id, tag, summary, responses, parameters, body, operator, description
    )

    def attach(endpoint: Described) -> Described:
        setattr(endpoint, _ATTRIBUTE, described)
        return endpoint

    return attach


def described(endpoint: object) -> Operation | None:
    """The `Operation` attached to `endpoint`, if any."""
    found = getattr(endpoint, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None


# -- building blocks ------------------------------------------------------------------------


def ref(model: type[BaseModel]) -> Schema:
    """A reference to `model`'s schema in the document's components."""
    return {"$ref": REF.format(model=model.__name__)}


def array(model: type[BaseModel]) -> Schema:
    """A JSON array of `model`."""
    return {"type": "array", "items": ref(model)}


def header(description: str, schema: Schema | None = None, *, required: bool = True) -> Schema:
    """A response header (a string unless `schema` says otherwise)."""
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


ETAG = header("The listing's version: send it back in If-None-Match.")
RETRY_AFTER = header("Seconds to wait before trying again.", {"type": "integer", "minimum": 0})
CACHE_CONTROL = header("`no-cache`: revalidate with If-None-Match.")


def json(schema: Schema, description: str, headers: dict[str, Schema] | None = None) -> Schema:
    """A JSON response."""
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def error(description: str, *codes: str, headers: dict[str, Schema] | None = None) -> Schema:
    """An `ErrorOut` whose `code` is one of `codes`."""
    schema = {"allOf": [ref(schemas.ErrorOut), {"properties": {"code": {"enum": list(codes)}}}]}
    listed = ", ".join(f"`{code}`" for code in codes)
    return json(schema, f"{description} (`code`: {listed})", headers)


def error_codes(response: Schema) -> list[str]:
    """The codes an `error(...)` response lists."""
    codes: list[str] = response["content"]["application/json"]["schema"]["allOf"][1]["properties"][
        "code"
    ]["enum"]
    return codes


def json_body(model: type[BaseModel]) -> Schema:
    """A required JSON request body of `model`."""
    return {"required": True, "content": {"application/json": {"schema": ref(model)}}}


def query_parameters(model: type[BaseModel]) -> list[Schema]:
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


def path_parameter(name: str, description: str, schema: Schema) -> Schema:
    """A parameter taken from the path template (`{name}`)."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def component_parameter(name: str) -> Schema:
    """A parameter of the document's components (`IdempotencyKey`, `IfNoneMatch`)."""
    return {"$ref": f"#/components/parameters/{name}"}


PRODUCT_ID = path_parameter(
    "product_id",
    "A product's id. Anything else (not a positive 32-bit integer) is answered 404.",
    {"type": "integer", "minimum": 1, "maximum": schemas.MAX_INT32},
)
RESERVATION_ID = path_parameter(
    "reservation_id",
    "A reservation's id. A malformed id is answered 404 like an unknown one.",
    {"type": "string", "pattern": RESERVATION_ID_PATTERN},
)

# Answers several endpoints share.
DATABASE = error("The database is busy or unreachable", DATABASE_BUSY, DATABASE_UNAVAILABLE)
INVALID = error(
    "The body (or a header) is invalid: `details` says which field and why",
    INVALID_REQUEST,
    INVALID_JSON,
)
NOT_JSON = error("The body is not sent as application/json", UNSUPPORTED_MEDIA_TYPE)
NO_PRODUCT = error("There is no such product", errors.ProductNotFound.code)
NO_RESERVATION = error(
    "There is no such reservation (or it is another shopper's)", errors.ReservationNotFound.code
)
SHOPPER_UNAUTHORIZED = error(
    "The shopper's token (Authorization: Bearer <JWT>), Shopper-Token or cookie is there "
    "but not valid: expired, signed with another key or algorithm, without `sub`; or "
    "REQUIRE_SHOPPER_TOKEN is on and the request has no token",
    UNAUTHORIZED,
    headers={"WWW-Authenticate": header("`Bearer`.")},
)
SHOP_KEY_REFUSED = error(
    "The bearer token is a shop API key: the shop's backend uses one only to complete holds "
    "(`POST /api/reservations/{id}/complete`), never as a shopper",
    SHOP_KEY_NOT_ALLOWED,
)
UNAUTHORIZED_ANSWER = error("The operator token is missing or wrong", UNAUTHORIZED)
SIGN_IN_THROTTLED_ANSWER = error(
    "Too many wrong operator tokens from this client lately (ADMIN_SIGN_IN_LIMIT)",
    "too_many_failed_sign_ins",
    headers={"Retry-After": RETRY_AFTER},
)
# Every operator endpoint's answers to who is asking: a missing or wrong token, and the
# throttle after too many wrong ones (server/api/admin.py: `operator_only`).
OPERATOR_AUTH: dict[str, Schema] = {
    "401": UNAUTHORIZED_ANSWER,
    "429": SIGN_IN_THROTTLED_ANSWER,
}
NO_OPERATOR_API = error("No operator token is configured: there is no operator API", NOT_FOUND)
PRODUCT_OR_NO_OPERATOR_API = error(
    "There is no such product, or no operator API", errors.ProductNotFound.code, NOT_FOUND
)
RESERVATION = json(ref(schemas.ReservationOut), "The reservation")
PRODUCT = json(ref(schemas.ProductOut), "The product")
