"""HTTP plumbing: reading bodies strictly, rendering JSON, and the one table that turns
errors into responses (`{"statusCode", "error", "code", "message", "details"?}`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_json
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from server.api.spec import DATABASE_BUSY as DATABASE_BUSY_CODE
from server.api.spec import DATABASE_UNAVAILABLE as DATABASE_UNAVAILABLE_CODE
from server.api.spec import query_parameters
from server.domain import errors, text
from server.domain.inventory import SHOWN_ID_CHARS, id_cut, ids_cut
from server.infra.logs import loggable
from server.infra.metrics import DATABASE_BUSY
from server.service.shop import Shop
from server.storage.errors import Busy, NotAttempted, StorageError, Unavailable
from server.wire import schemas
from server.wire.json_text import repeated_key
from server.wire.schemas import MAX_INT32, FieldError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
DATABASE_BUSY_GAVE_UP = DATABASE_BUSY.labels("gave_up")
MAX_BODY_BYTES = 16 * 1024
# Path parameters that let whoever knows them act (a reservation id is a bearer token for
# its hold): logs show only their first characters, enough to tell lines apart.
SECRET_PARAMS = frozenset({"reservation_id"})
SECRET_PREFIX_CHARS = SHOWN_ID_CHARS


class RequestError(Exception):
    """The request itself is wrong (malformed, too large, not allowed, too many): answered
    with `status` and `code`; nothing was looked at or changed. Not a domain error: the
    stock was never asked."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.headers = headers


# status, and extra headers, per domain error
_STATUS: dict[type[errors.DomainError], tuple[int, Mapping[str, str]]] = {
    errors.ProductNotFound: (404, {}),
    errors.ReservationNotFound: (404, {}),
    errors.InsufficientStock: (409, {}),
    errors.SaleNotStarted: (409, {}),
    errors.SalePaused: (409, {}),
    errors.SaleEnded: (409, {}),
    errors.StockCommitted: (409, {}),
    errors.InvalidSchedule: (409, {}),
    errors.ShopperLimitReached: (409, {}),
    errors.ReservationExpired: (409, {}),
    errors.ReservationCancelled: (409, {}),
    errors.ReservationCompleted: (409, {}),
    errors.IdempotencyKeyReused: (422, {}),
    errors.QueueOff: (409, {}),
    errors.QueueNotOpen: (409, {}),
    errors.QueueInUse: (409, {}),
    errors.NoTicket: (404, {}),
    errors.NotAdmitted: (403, {}),
}
# status, code and headers, per storage error that is not a bug: nothing was changed
_STORAGE: dict[type[StorageError], tuple[int, str, Mapping[str, str]]] = {
    Busy: (503, DATABASE_BUSY_CODE, {"Retry-After": "1"}),
    Unavailable: (503, DATABASE_UNAVAILABLE_CODE, {"Retry-After": "5"}),
}


def loggable_path(scope: Mapping[str, Any]) -> str:
    """The request's path as a log line may show it: the route's template with its
    parameters filled in, secret ones (`SECRET_PARAMS`) cut to a prefix; for a path no
    route matched, the path as sent (still percent-encoded), its runs of 22 or more URL-safe
    characters (a hold id's shape) cut the same way (`inventory.ids_cut`). Escaped and cut
    short either way (`server.infra.logs.loggable`, `server.domain.text.SHOWN_CHARS`)."""
    route = scope.get("route")
    params = scope.get("path_params")
    template = getattr(route, "path", None)
    if template is not None and params and "{" in template:
        path = template
        for name, value in params.items():
            text = str(value)
            if name in SECRET_PARAMS and len(text) > SECRET_PREFIX_CHARS:
                text = id_cut(text)
            path = path.replace("{" + name + "}", text)
        return loggable(path)
    # No route: a hold's path with a trailing slash (answered by a redirect, which the
    # client may follow without noticing), or a typo. Any run of characters that could be
    # (or hold) a hold id is cut as a matched route's is.
    raw = scope.get("raw_path")
    sent = raw.decode("latin-1") if raw else str(scope.get("path", ""))
    return loggable(ids_cut(sent))


def error_body(status: int, code: str, message: str) -> bytes:
    """An `ErrorOut`'s JSON, for answers written below Starlette (server/api/protocol.py)."""
    return to_json(
        {"statusCode": status, "error": _PHRASES[status], "code": code, "message": message}
    )


def json_response(
    content: BaseModel | list[Any] | dict[str, Any] | bytes,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    if isinstance(content, bytes):
        body = content
    elif isinstance(content, BaseModel):
        body = content.model_dump_json().encode()
    else:
        body = to_json(content)
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """An `ErrorOut`; `extra` are the error's own fields (`DomainError.body`)."""
    view: dict[str, Any] = {
        "statusCode": status,
        "error": _PHRASES[status],
        "code": code,
        "message": message,
    }
    if details:
        view["details"] = [d.model_dump() for d in details]
    if extra:
        view.update(extra)
    return json_response(view, status, headers)


async def domain_error(request: Request, exc: Exception) -> Response:
    """What the stock or the rules refused: 404, 409 or 422 (`_STATUS`)."""
    assert isinstance(exc, errors.DomainError)
    return domain_response(request, exc)


def domain_response(request: Request, exc: errors.DomainError) -> Response:
    """The answer to a refusal of the stock or the rules (`domain_error`'s), for a route
    that catches its refusals itself: a storm's sold-out refusals are most of its answers,
    and each one raised out of the route went up through Starlette's exception middleware
    to the handler it looks up, a few µs of the event loop a refusal."""
    status, headers = _STATUS.get(type(exc), (500, {}))
    if status >= 500:
        logger.warning("%s answered %d: %s", _where(request), status, exc)
    return error_response(status, exc.code, exc.message, headers=headers, extra=exc.body())


async def request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(
        exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers
    )


async def storage_error(request: Request, exc: Exception) -> Response:
    """The database was busy or unreachable: 503 with Retry-After. Any other storage error
    (a UNIQUE constraint the service did not expect) is a bug: 500."""
    assert isinstance(exc, StorageError)
    known = _STORAGE.get(Busy if isinstance(exc, Busy) else type(exc))
    if known is None:
        return await internal_error(request, exc)
    status, code, headers = known
    if isinstance(exc, NotAttempted):
        headers = {"Retry-After": str(exc.retry_after_s)}
    logger.warning("%s answered %d: %s", _where(request), status, exc)
    if isinstance(exc, Busy):
        DATABASE_BUSY_GAVE_UP.inc()
    return error_response(status, code, str(exc), headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    path = shown(request.url.path)
    messages = {
        404: f"There is nothing at {path}.",
        405: f"{shown(request.method)} is not allowed on {path}.",
    }
    status = exc.status_code
    return error_response(
        status,
        codes.get(status, "http_error"),
        messages.get(status, str(exc.detail)),
        headers=exc.headers,
    )


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client went away mid-request (Starlette's `ClientDisconnect`): nothing to answer
    and nothing wrong on our side, so no traceback and no 5xx. The access line records it
    as 499, nginx's "client closed request". (Bodies are read before the application runs,
    by server/api/middleware.py, so this is the rare case of a later read.)"""
    return Response(status_code=499)


def _where(request: Request) -> str:
    return f"{loggable(request.method, 20)} {loggable_path(request.scope)}"


async def internal_error(request: Request, exc: Exception) -> Response:
    logger.error("%s failed", _where(request), exc_info=(type(exc), exc, exc.__traceback__))
    return error_response(
        500, "internal_error", "Something went wrong on our side; it has been logged."
    )


EXCEPTION_HANDLERS = {
    ClientDisconnect: client_gone,
    errors.DomainError: domain_error,
    RequestError: request_error,
    StorageError: storage_error,
    HTTPException: http_error,
    Exception: internal_error,
}


async def parse_body(request: Request, model: type[M], context: dict[str, Any] | None = None) -> M:
    """The request body as `model`, or a 4xx `RequestError` saying exactly what is wrong;
    an object that names a key twice is 400 `invalid_json` naming it (`repeated_key`)."""
    body = await request.body()
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not body:
        raise RequestError(400, "invalid_request", "The request body is empty; send a JSON object.")
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            "Send the body as JSON, with Content-Type: application/json.",
        )
    repeated = repeated_key(body)
    if repeated is not None:
        raise RequestError(
            400,
            "invalid_json",
            f'The request body is not valid JSON here: it names the key "{shown(repeated)}" '
            "more than once; send each key once.",
        )
    try:
        return model.model_validate_json(body, context=context)
    except ValidationError as exc:
        raise _invalid(exc) from None


DEFAULT_PAGE = 100  # a list's page when none is asked for: products, their figures
MAX_PAGE = 1000

# A page's size: 1 to MAX_PAGE items, or None (not given: the list's own default).
PageLimit = Annotated[int | None, Field(ge=1, le=MAX_PAGE)]


class ProductIds(BaseModel):
    """The query of a list of products: those a page shows (`ids`), or every one."""

    model_config = ConfigDict(extra="forbid")

    ids: Annotated[
        schemas.StoredText | None,
        Field(
            max_length=schemas.MAX_PRODUCT_IDS * 11,
            description=f"Only these products: {schemas.PRODUCT_IDS_RULE}. Unknown ids are "
            "left out.",
            examples=["3,8,9"],
            # In the document only (the URL then stays short): the check is `_ids`, whose
            # refusal says the rule.
            json_schema_extra={"pattern": "^[0-9]{1,10}(,[0-9]{1,10}){0,99}$"},
        ),
    ] = None

    @field_validator("ids")
    @classmethod
    def _ids(cls, value: str | None) -> str | None:
        if value is not None:
            schemas.parse_product_ids(value)
        return value


class IdsOrPage(ProductIds):
    """The query of a list of products: those a page shows (`ids`), or a page of them
    (`limit` and a cursor, an id, that the subclass adds, with what its page is in `limit`'s
    description: `limit: Annotated[PageLimit, Field(description=...)] = None`). Every field
    but `ids` is the page's: asking for both ways at once is refused (400)."""

    limit: PageLimit = None

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        page = [name for name in type(self).model_fields if name != "ids"]
        if self.ids is not None and any(getattr(self, name) is not None for name in page):
            fields = ", ".join(f"`{name}`" for name in page)
            raise ValueError(f"ask for `ids` or for a page ({fields}), not both")
        return self


class IdsOrPageAfter(IdsOrPage):
    """`IdsOrPage` whose page is by product id: `limit` of them after the id `after`, the
    next page's address in a `Link` header (the console's figures, the rooms' counts)."""

    limit: Annotated[
        PageLimit,
        Field(
            description=f"At most this many, by product id (default {DEFAULT_PAGE}); a "
            '`Link` header with `rel="next"` gives the address of the next page when there '
            "are more.",
        ),
    ] = None
    after: Annotated[
        int | None,
        Field(
            ge=0,
            le=MAX_INT32,
            description="The page holds those of products with ids above this one (the "
            "`Link` header's next page says which).",
        ),
    ] = None


def parse_params(data: Mapping[str, Any], model: type[M]) -> M:
    """Query parameters as `model` (lax: they arrive as text). A refusal names each
    parameter and the value sent for it. A parameter of `model` sent more than once
    (`?limit=5&limit=7`) is refused, naming it: each of ours takes one value (the OpenAPI
    document has no array among them), and taking the last silently answered a question
    the client may not have meant."""
    repeated = _repeated(data, model)
    if repeated:
        name, times = repeated[0]
        problems = [
            FieldError(field=shown(n), message=f"was sent {t} times; send it once")
            for n, t in repeated[:MAX_DETAILS]
        ]
        raise RequestError(
            400,
            "invalid_request",
            f"{shown(name)}: was sent {times} times; send it once.",
            problems,
        )
    try:
        return model.model_validate(dict(data), strict=False)
    except ValidationError as exc:
        raise _invalid(exc, echo=True) from None


def _repeated(data: Mapping[str, Any], model: type[BaseModel]) -> list[tuple[str, int]]:
    """The parameters of `model` that `data` (a query string's multi-dict) names more than
    once, with how many times, in the order first sent."""
    multi = getattr(data, "multi_items", None)
    if multi is None:
        return []
    times: dict[str, int] = {}
    for key, _ in multi():
        times[key] = times.get(key, 0) + 1
    if all(n == 1 for n in times.values()):
        return []
    single = _single_valued(model)
    return [(key, n) for key, n in times.items() if n > 1 and key in single]


@functools.cache
def _single_valued(model: type[BaseModel]) -> frozenset[str]:
    """The names of `model`'s query parameters that take one value, as the OpenAPI document
    lists them (`spec.query_parameters`: every one but an array's)."""
    return frozenset(
        p["name"] for p in query_parameters(model) if p["schema"].get("type") != "array"
    )


# The most problems one refusal lists. A 16 KiB body can name ~1,700 unknown fields: listing
# each (its field and message escaped, a FieldError, its JSON) took the event loop 66-104 ms
# on a loaded machine and answered 100 KB (attack8); the first few say what is wrong.
MAX_DETAILS = 20


def _invalid(exc: ValidationError, *, echo: bool = False) -> RequestError:
    """400 with a `FieldError` per problem, the first `MAX_DETAILS` of them (the message
    then says how many there were); `echo`: each message also quotes the value that was
    sent (query parameters: one short text each)."""
    details = []
    problems = exc.errors(include_url=False)
    for problem in problems[:MAX_DETAILS]:
        field = shown(".".join(str(part) for part in problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "json_invalid":
            # Where and why: "invalid unicode code point at line 1 column 11" for a lone
            # surrogate (`"\ud800"`), which no database could store (server.domain.text).
            why = str(problem.get("ctx", {}).get("error", "")).strip()
            where = f": {shown(why)}" if why else ""
            return RequestError(400, "invalid_json", f"The request body is not valid JSON{where}.")
        if problem["type"] == "extra_forbidden":
            message = "is not a field of this request"
        elif problem["type"] in ("too_short", "too_long") and isinstance(problem["input"], str):
            # Text checked after a validator of its own (StoredText) is measured as pydantic
            # measures a list: "at least 1 item"; these are characters.
            short = problem["type"] == "too_short"
            bound = problem.get("ctx", {}).get("min_length" if short else "max_length")
            unit = "character" if bound == 1 else "characters"
            message = (
                f"must be {'at least' if short else 'at most'} {bound} {unit}, "
                f"not {len(problem['input'])}"
            )
            if echo:
                message = f'{message}; "{shown(problem["input"])}" was sent'
        elif echo and isinstance(problem["input"], str):
            message = f'{message}; "{shown(problem["input"])}" was sent'
        if problem["type"] == "model_type":
            return RequestError(400, "invalid_request", "The request body must be a JSON object.")
        details.append(FieldError(field=field, message=message))
    first = details[0]
    message = f"{first.field}: {first.message}." if first.field else f"{first.message}."
    if len(problems) > MAX_DETAILS:
        message += f" There are {len(problems)} problems; the first {MAX_DETAILS} are listed."
    return RequestError(400, "invalid_request", message, details)


def shop_of(request: Request) -> Shop:
    shop: Shop = request.app.state.shop
    return shop


def path_id(request: Request, name: str) -> int | None:
    """A positive 32-bit id from the path, or None (answered 404 by the caller, naming what
    was sent: `path_sent`)."""
    text = request.path_params[name]
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_INT32 else None


@dataclass(frozen=True)
class PathId:
    """A resource addressed by a positive 32-bit id in the path (`/products/{product_id}`):
    the id, and the 404 naming what was sent when there is no such id or no such resource.

    `missing` builds that 404 from the parameter as sent (`path_sent`): a domain error
    (`ProductNotFound`) or a `RequestError`. Reading the id looks at nothing else, so an
    endpoint may check its body or query first and still answer 404 for the id after.
    """

    name: str
    missing: Callable[[int | str], Exception]

    def not_found(self, request: Request) -> Exception:
        """The 404 for this request's id, to raise."""
        return self.missing(path_sent(request, self.name))

    def id(self, request: Request) -> int:
        """The id from the path; anything but a positive 32-bit integer raises the 404."""
        found = path_id(request, self.name)
        if found is None:
            raise self.not_found(request)
        return found

    def found(self, request: Request, value: T | None) -> T:
        """`value`, what was loaded for the id; `None` (no such resource) raises the 404."""
        if value is None:
            raise self.not_found(request)
        return value

    async def load(self, request: Request, fetch: Callable[[int], Awaitable[T | None]]) -> T:
        """`fetch(id)`, or the 404 for an id that is malformed or finds nothing."""
        return self.found(request, await fetch(self.id(request)))


PRODUCT_PATH_ID = PathId("product_id", errors.ProductNotFound)


def path_sent(request: Request, name: str) -> int | str:
    """The path parameter `name` as the caller sent it, for a message that names it: an id
    written the usual way as its number, anything else as text fit to show (`shown`)."""
    text: str = request.path_params[name]
    if text.isascii() and text.isdigit() and len(text) <= 20 and str(int(text)) == text:
        return int(text)
    return shown(text)


def shown(value: str) -> str:
    """A client's value, fit to quote back in a message: escaped and cut to `SHOWN_CHARS`
    (`server.infra.logs.loggable`, `server.domain.text.SHOWN_CHARS`)."""
    return loggable(value, text.SHOWN_CHARS)


def header_text(name: str, value: str, max_chars: int) -> str:
    """A header's value that will be stored or logged, checked by the one rule for text
    (`server.domain.text.problem`); else 400 `invalid_request` naming the header."""
    found = text.problem(value, max_chars)
    if found is not None:
        raise RequestError(
            400,
            "invalid_request",
            f"{name}: {found}.",
            [FieldError(field=name, message=found)],
        )
    return value
