"""What clients send (issue 15, items 3 and 5), in process, on SQLite and PostgreSQL.

Text no database could store (a U+0000, a lone surrogate, too many characters) is refused
with 400 naming the field, and changes nothing: it once answered 500, and on PostgreSQL the
connection that carried it was reset. An id or a parameter that cannot be read is answered
with a message that names what was sent: `GET /api/products/abc` once said "There is no
product 0.".
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
import types
import typing
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from annotated_types import MaxLen
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel, ValidationError
from pydantic_core import from_json, to_json

import server.api
from server.api.http import MAX_DETAILS, RequestError, parse_params
from server.domain import text
from server.domain.model import Product, Reservation, Status
from server.domain.text import problem
from server.service.catalog import Catalog
from server.service.delivery import Deliverer
from server.service.webhooks import Webhooks
from server.storage.database import Store
from server.wire import json_text, schemas
from server.wire.json_text import repeated_key
from server.wire.schemas import JoinMessage, plain_join, product_view
from tests.receiver import Receiver
from tests.support import eventually, hold, make_product, serve, stats
from tests.test_api import TOKEN, Api, app_settings, assert_error


@pytest.fixture
async def api(database_url: str, redis_url: str, store: Store) -> AsyncIterator[Api]:
    async for client in serve(app_settings(database_url, redis_url)):
        yield Api(client, store)


# -- the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("\x00", "U+0000"),
        ("\x00starts", "U+0000"),
        ("in\x00side", "U+0000"),
        ("ends\x00", "U+0000"),
        ("a\ud800b", "lone surrogate"),
        ("\udfff", "lone surrogate"),
        ("x" * 11, "at most 10 characters (it has 11)"),
    ],
)
def test_the_text_rule_names_what_no_database_can_store(value: str, why: str) -> None:
    found = problem(value, 10)
    assert found is not None
    assert why in found


@pytest.mark.parametrize("value", ["", "plain", "naïve café", "😀 emoji", "x" * 10, "tab\tok"])
def test_the_text_rule_takes_what_both_databases_store(value: str) -> None:
    assert problem(value, 10) is None
    assert text.is_storable(value, 10)


def _request_models() -> list[type[BaseModel]]:
    """Every model a request is read with: the request bodies (`schemas._Request`) and the
    query models the endpoints define (every model in `server.api` that is not a response)."""
    found: list[type[BaseModel]] = []
    frontier: list[type[BaseModel]] = [schemas._Request]
    while frontier:
        for sub in frontier.pop().__subclasses__():
            found.append(sub)
            frontier.append(sub)
    for info in pkgutil.iter_modules(server.api.__path__, "server.api."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value.__module__ == module.__name__
                and not issubclass(value, schemas._Response)
            ):
                found.append(value)
    return found


def _string_annotations(annotation: Any) -> list[Any]:
    """Each `str` in `annotation`, with its Annotated metadata (a list's items too)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        return [(a, [*metadata, *m]) for a, m in _string_annotations(inner)]
    if origin in (typing.Union, types.UnionType, list):
        return [found for arg in typing.get_args(annotation) for found in _string_annotations(arg)]
    return [(annotation, [])] if annotation is str else []


def test_every_string_a_request_takes_is_checked_by_the_rule() -> None:
    checked = 0
    models = _request_models()
    names = {m.__name__ for m in models}
    assert {"ProductsQuery", "LedgerQuery", "DeliveryQuery", "ReservationQuery"} <= names
    for model in models:
        for name, field in model.model_fields.items():
            for _, inner in _string_annotations(field.annotation):
                metadata = [*field.metadata, *inner]
                validators = [m.func for m in metadata if isinstance(m, AfterValidator)]
                assert schemas._storable in validators, f"{model.__name__}.{name}"
                assert any(isinstance(m, MaxLen) for m in metadata), f"{model.__name__}.{name}"
                checked += 1
    assert checked >= 7  # names, URL, description, order reference, ids, cursor, watch


# -- bodies ---------------------------------------------------------------------------------

PRODUCT = {"price": 1, "stock": 5}
WEBHOOK = {"url": "http://127.0.0.1:9/hook"}
UNSTORABLE_BODIES = [
    ("/api/admin/products", {**PRODUCT, "name": "\x00Shoes"}, "name"),
    ("/api/admin/products", {**PRODUCT, "name": "Sh\x00oes"}, "name"),
    ("/api/admin/products", {**PRODUCT, "name": "Shoes\x00"}, "name"),
    ("/api/admin/products", {**PRODUCT, "name": "x" * 201}, "name"),
    ("/api/admin/webhooks", {"url": "http://127.0.0.1:9/\x00hook"}, "url"),
    ("/api/admin/webhooks", {"url": "http://127.0.0.1:9/" + "x" * 2000}, "url"),
    ("/api/admin/webhooks", {**WEBHOOK, "description": "night\x00shift"}, "description"),
    ("/api/admin/webhooks", {**WEBHOOK, "description": "x" * 201}, "description"),
    ("/api/admin/shop-keys", {"name": "\x00"}, "name"),
    ("/api/admin/shop-keys", {"name": "till\x00 1"}, "name"),
    ("/api/admin/shop-keys", {"name": "x" * 101}, "name"),
    ("PATCH /api/admin/products/1", {"name": "Sh\x00oes"}, "name"),
    ("PATCH /api/admin/products/1", {"name": "x" * 201}, "name"),
    ("/api/admin/reservations/R/cancel", {"reason": "no\x00pay"}, "reason"),
    ("/api/admin/reservations/R/cancel", {"reason": "x" * 201}, "reason"),
]


async def _counts(api: Api) -> tuple[int, int, int]:
    products = await api.admin("GET", "/api/admin/stats")
    hooks = await api.admin("GET", "/api/admin/webhooks")
    keys = await api.admin("GET", "/api/admin/shop-keys")
    return len(products.json()), len(hooks.json()), len(keys.json())


async def _names(api: Api) -> list[str]:
    return [p["name"] for p in (await api.client.get("/api/products")).json()]


@pytest.mark.parametrize(
    ("path", "body", "field"), UNSTORABLE_BODIES, ids=[f"{p} {f}" for p, _, f in UNSTORABLE_BODIES]
)
async def test_text_no_database_can_store_is_400_naming_the_field(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    product = await make_product(api.store, 5)
    held = await api.reserve(product.id, 1)
    method, _, path = path.rpartition(" ")
    path = path.replace("/products/1", f"/products/{product.id}")
    path = path.replace("/R/", f"/{held.json()['id']}/")
    before = await _counts(api), await stats(api.store, product.id), await _names(api)
    response = await api.admin(method or "POST", path, json=body)
    error = assert_error(response, 400, "invalid_request")
    assert [d["field"] for d in error["details"]] == [field], error
    assert error["message"].startswith(f"{field}: "), error
    assert (await _counts(api), await stats(api.store, product.id), await _names(api)) == before
    # The same client goes on being served (no connection was reset, nothing is stuck).
    assert (await api.admin("GET", "/api/admin/stats")).status_code == 200


@pytest.mark.parametrize("path", ["/api/admin/products", "/api/admin/shop-keys"])
async def test_a_lone_surrogate_in_a_body_is_invalid_json_that_says_where(
    api: Api, path: str
) -> None:
    before = await _counts(api)
    raw = b'{"name": "a\\ud800b", "price": 1, "stock": 5}'
    if path.endswith("shop-keys"):
        raw = b'{"name": "a\\udc00b"}'
    response = await api.client.post(
        path,
        content=raw,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    error = assert_error(response, 400, "invalid_json")
    assert "line 1 column" in error["message"], error
    assert await _counts(api) == before


@pytest.mark.parametrize(
    ("path", "raw", "key"),
    [
        ("/api/admin/products", b'{"name": "a", "price": 1, "stock": 5, "name": "b"}', "name"),
        ("/api/admin/shop-keys", b'{"name": "till", "name": "till 2"}', "name"),
        ("/api/reservations", b'{"productId": 0, "quantity": 1, "quantity": 9}', "quantity"),
        # Escapes name the same key: "quantity" twice.
        ("/api/reservations", b'{"productId": 0, "quantity": 1, "quan\\u0074ity": 9}', "quantity"),
    ],
)
async def test_a_key_named_twice_is_invalid_json_naming_it(
    api: Api, path: str, raw: bytes, key: str
) -> None:
    # pydantic's parser keeps the last value; whoever reads the first one sees another request.
    product = await make_product(api.store, 5)
    raw = raw.replace(b'"productId": 0', f'"productId": {product.id}'.encode())
    before = await _counts(api)
    headers = {"Content-Type": "application/json"}
    if path.startswith("/api/admin/"):
        headers["Authorization"] = f"Bearer {TOKEN}"
    response = await api.client.post(path, content=raw, headers=headers)
    error = assert_error(response, 400, "invalid_json")
    assert f'"{key}" more than once' in error["message"], error
    assert await _counts(api) == before
    assert (await stats(api.store, product.id)).held == 0


def _first_repeated(text: bytes) -> str | None:
    """The oracle: the parser, told to stop at an object's second use of a key."""

    class Repeated(Exception):
        pass

    def unique(pairs: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Repeated(key)
            seen.add(key)

    try:
        json.loads(text, object_pairs_hook=unique)
    except Repeated as found:
        return str(found.args[0])
    except (ValueError, RecursionError):
        return None
    return None


# Pieces of flat objects, and of texts that only look like them: keys that are a colon, a
# comma or empty, escapes, nesting, stray quotes.
_KEYS = [b'"a"', b'"b"', b'":b"', b'""', b'"a,"', b'":"', b'"\\u0061"', b'"q\\""']
_VALUES = [b"1", b'"x"', b'":"', b"null", b'"a"', b'""', b'{"a":1}', b"[1,2]", b'"\\""', b"-1.5e3"]
_JUNK = [b'"', b":", b",", b"{", b"}", b" ", b"\\", b"a", b"\n"]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_KEYS),
            st.sampled_from([b":", b" : ", b"\t:\n"]),
            st.sampled_from(_VALUES),
        ),
        max_size=6,
    ),
    st.lists(st.tuples(st.integers(0, 200), st.sampled_from(_JUNK)), max_size=2),
)
def test_the_quick_check_of_repeated_keys_answers_as_the_parser(
    pairs: list[tuple[bytes, bytes, bytes]], junk: list[tuple[int, bytes]]
) -> None:
    # The fast path for flat bodies (json_text._no_repeat_in_flat) never says "none" where
    # the parser finds one, nor names another key.
    text = b"{" + b",".join(k + c + v for k, c, v in pairs) + b"}"
    for at, piece in junk:
        text = text[: at % (len(text) + 1)] + piece + text[at % (len(text) + 1) :]
    assert repeated_key(text) == _first_repeated(text)
    # Again, as a text already seen (json_text._KNOWN remembers those found clean).
    assert repeated_key(text) == _first_repeated(text)


def test_the_texts_known_clean_are_bounded() -> None:
    # Every request may send a new body: what is remembered of them stays bounded, in count
    # and in each text's length, and a longer text is still checked in full each time.
    for n in range(json_text._KNOWN_MOST * 2):
        assert repeated_key(b'{"productId": %d, "quantity": 1}' % n) is None
    assert len(json_text._KNOWN) <= json_text._KNOWN_MOST
    long = b'{"a": "' + b"x" * json_text._KNOWN_TEXT_MOST + b'"}'
    assert repeated_key(long) is None
    assert long not in json_text._KNOWN
    assert repeated_key(b'{"quantity": 1, "quantity": 500}') == "quantity"
    assert b'{"quantity": 1, "quantity": 500}' not in json_text._KNOWN


async def test_names_with_any_storable_character_are_kept_as_sent(api: Api) -> None:
    name = "Ünïcödé 😀 \t shoes"
    created = await api.admin("POST", "/api/admin/products", json={**PRODUCT, "name": name})
    assert created.status_code == 201, created.text
    assert (await api.client.get(f"/api/products/{created.json()['id']}")).json()["name"] == name


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (b"a\x00b", "U+0000"),
        (b"x" * 256, "at most 255 characters"),
        (b"na\xefve", "printable ASCII"),
        (b"tab\there", "printable ASCII"),
    ],
)
async def test_an_idempotency_key_that_cannot_be_stored_is_400_naming_it(
    api: Api, key: bytes, why: str
) -> None:
    product = await make_product(api.store, 5)
    response = await api.client.post(
        "/api/reservations",
        json={"productId": product.id, "quantity": 1},
        headers=[(b"Idempotency-Key", key)],
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["details"][0]["field"] == "Idempotency-Key", error
    assert why in error["message"], error
    s = await stats(api.store, product.id)
    assert (s.available, s.held) == (5, 0)


async def test_an_idempotency_key_sent_twice_is_400_and_holds_nothing(api: Api) -> None:
    """Two Idempotency-Key headers: we would read the first, a proxy or log the last (or
    both joined), two different requests. Refused, as a JSON key named twice is."""
    product = await make_product(api.store, 5)
    response = await api.client.post(
        "/api/reservations",
        json={"productId": product.id, "quantity": 1},
        headers=[(b"Idempotency-Key", b"first"), (b"Idempotency-Key", b"second")],
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["details"][0]["field"] == "Idempotency-Key", error
    assert "once; 2 were sent" in error["message"], error
    s = await stats(api.store, product.id)
    assert (s.available, s.held) == (5, 0)


async def test_a_body_of_many_unknown_fields_is_refused_listing_only_the_first(api: Api) -> None:
    """A 16 KiB body can name ~1,700 unknown fields; listing each cost the event loop ~0.1 s
    and answered 100 KB (attack8). The refusal lists the first MAX_DETAILS and says how many
    there were; nothing is held."""
    product = await make_product(api.store, 5)
    body = {"productId": product.id, "quantity": 1} | {f"k{i}": 1 for i in range(1500)}
    response = await api.client.post("/api/reservations", json=body)
    error = assert_error(response, 400, "invalid_request")
    assert len(error["details"]) == MAX_DETAILS, len(error["details"])
    assert [d["field"] for d in error["details"]] == [f"k{i}" for i in range(MAX_DETAILS)]
    assert error["message"].startswith("k0: is not a field of this request."), error
    assert f"There are 1500 problems; the first {MAX_DETAILS} are listed." in error["message"]
    assert len(response.content) < 4096
    s = await stats(api.store, product.id)
    assert (s.available, s.held) == (5, 0)


# -- query parameters ---------------------------------------------------------------------


BAD_QUERIES = [
    ("/api/products?ids=1%002", "ids", '"1\\x002" was sent'),
    ("/api/products?ids=abc", "ids", '"abc" was sent'),
    ("/api/products?limit=lots", "limit", '"lots" was sent'),
    ("/api/products?before=%00", "before", '"\\x00" was sent'),
    ("/api/admin/reservations?productId=abc", "productId", '"abc" was sent'),
    ("/api/admin/reservations?status=%00GONE", "status", '"\\x00GONE" was sent'),
    ("/api/admin/reservations?limit=5000", "limit", '"5000" was sent'),
    ("/api/admin/products/1/ledger?cursor=%00", "cursor", '"\\x00" was sent'),
    ("/api/admin/products/1/ledger?cursor=12.x", "cursor", '"12.x" was sent'),
    ("/api/admin/products/1/ledger?since=yesterday", "since", '"yesterday" was sent'),
    ("/api/admin/webhooks/1/deliveries?limit=-1", "limit", '"-1" was sent'),
    ("/api/products?" + "x" * 300 + "=1", "x" * 64 + "...", "is not a field"),
]


@pytest.mark.parametrize(("path", "field", "named"), BAD_QUERIES)
async def test_a_bad_query_parameter_is_400_naming_it_and_what_was_sent(
    api: Api, path: str, field: str, named: str
) -> None:
    await make_product(api.store, 5)
    error = assert_error(await api.admin("GET", path), 400, "invalid_request")
    assert error["details"][0]["field"] == field, error
    assert named in error["message"], error


REPEATED_QUERIES = [
    ("/api/products?limit=5&limit=7", "limit", 2),
    ("/api/queues?after=1&limit=2&after=3&after=4", "after", 3),
    ("/api/admin/reservations?status=ACTIVE&status=EXPIRED", "status", 2),
    ("/api/admin/products/1/ledger?since=1&since=1", "since", 2),
]


@pytest.mark.parametrize(("path", "field", "times"), REPEATED_QUERIES)
async def test_a_query_parameter_sent_twice_is_400_naming_it(
    api: Api, path: str, field: str, times: int
) -> None:
    """Each query parameter of ours takes one value (the OpenAPI document lists none as an
    array): `?limit=5&limit=7` took the last silently, answering what the client may not
    have asked. It is refused, naming it; a list is one value, comma-separated."""
    product = await make_product(api.store, 5)
    error = assert_error(await api.admin("GET", path), 400, "invalid_request")
    assert error["details"][0]["field"] == field, error
    assert error["message"] == f"{field}: was sent {times} times; send it once.", error
    for listing in ("/api/products", "/api/queues", "/api/admin/stats"):
        listed = await api.admin("GET", f"{listing}?ids={product.id},{product.id + 1}")
        assert listed.status_code == 200, listed.text


# -- ids in the path ------------------------------------------------------------------------


NOT_FOUND = [
    ("GET", "/api/products/abc", "product_not_found", 'There is no product "abc".'),
    ("GET", "/api/products/0", "product_not_found", "There is no product 0."),
    ("GET", "/api/products/999999", "product_not_found", "There is no product 999999."),
    ("GET", "/api/products/007", "product_not_found", 'There is no product "007".'),
    ("GET", "/api/products/1.0", "product_not_found", 'There is no product "1.0".'),
    ("GET", "/api/products/-1", "product_not_found", 'There is no product "-1".'),
    ("GET", "/api/products/%00", "product_not_found", 'There is no product "\\x00".'),
    ("GET", "/api/products/99999999999", "product_not_found",
     "There is no product 99999999999."),
    ("GET", "/api/products/" + "a" * 300, "product_not_found",
     'There is no product "' + "a" * 64 + '...".'),
    ("GET", "/api/reservations/short", "reservation_not_found",
     'There is no reservation "short".'),
    ("GET", "/api/reservations/AAAAAAAAAAAAAAAAAAAAAA", "reservation_not_found",
     'There is no reservation "AAAAAAAAAAAAAAAAAAAAAA".'),
    ("POST", "/api/reservations/%00x/complete", "reservation_not_found",
     'There is no reservation "\\x00x".'),
    ("POST", "/api/reservations/AAAAAAAAAAAAAAAAAAAAAA/cancel", "reservation_not_found",
     'There is no reservation "AAAAAAAAAAAAAAAAAAAAAA".'),
    ("POST", "/api/admin/products/abc/restock", "product_not_found",
     'There is no product "abc".'),
    ("GET", "/api/admin/products/abc/stats", "product_not_found", 'There is no product "abc".'),
    ("GET", "/api/admin/products/424242/stats", "product_not_found",
     "There is no product 424242."),
    ("GET", "/api/admin/products/abc/ledger", "product_not_found", 'There is no product "abc".'),
    ("GET", "/api/admin/webhooks/abc", "not_found", 'There is no webhook endpoint "abc".'),
    ("GET", "/api/admin/webhooks/77", "not_found", "There is no webhook endpoint 77."),
    ("POST", "/api/admin/webhooks/x1/enable", "not_found", 'There is no webhook endpoint "x1".'),
    ("POST", "/api/admin/webhooks/9/rotate-secret", "not_found",
     "There is no webhook endpoint 9."),
    ("DELETE", "/api/admin/webhooks/9", "not_found", "There is no webhook endpoint 9."),
    ("DELETE", "/api/admin/webhooks/x9", "not_found", 'There is no webhook endpoint "x9".'),
    ("GET", "/api/admin/webhooks/abc/deliveries", "not_found",
     'There is no webhook endpoint "abc".'),
    ("POST", "/api/admin/webhooks/3/deliveries/msg_nope/redeliver", "not_found",
     'There is no delivery of event "msg_nope" to webhook endpoint 3.'),
    ("POST", "/api/admin/shop-keys/abc/revoke", "not_found", 'There is no shop key "abc".'),
    ("POST", "/api/admin/shop-keys/12/revoke", "not_found", "There is no shop key 12."),
    ("PATCH", "/api/admin/products/abc", "product_not_found", 'There is no product "abc".'),
    ("PATCH", "/api/admin/products/31337", "product_not_found", "There is no product 31337."),
    ("POST", "/api/admin/products/x/pause", "product_not_found", 'There is no product "x".'),
    ("POST", "/api/admin/products/0/end", "product_not_found", "There is no product 0."),
    ("POST", "/api/admin/reservations/short/cancel", "reservation_not_found",
     'There is no reservation "short".'),
    ("POST", "/api/admin/reservations/AAAAAAAAAAAAAAAAAAAAAA/cancel", "reservation_not_found",
     'There is no reservation "AAAAAAAAAAAAAAAAAAAAAA".'),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "code", "message"), NOT_FOUND)
async def test_an_id_that_names_nothing_is_404_naming_what_was_sent(
    api: Api, method: str, path: str, code: str, message: str
) -> None:
    if method == "PATCH":
        response = await api.admin(method, path, json={"name": "New name"})
    elif "/products/" in path and "restock" in path:
        response = await api.admin(method, path, json={"quantity": 1})
    else:
        response = await api.admin(method, path)
    error = assert_error(response, 404, code)
    assert error["message"] == message


async def test_a_path_that_names_nothing_is_404_naming_it_cut_short(api: Api) -> None:
    error = assert_error(await api.client.get("/api/nothing%00here"), 404, "not_found")
    assert error["message"] == "There is nothing at /api/nothing\\x00here."
    error = assert_error(await api.client.get("/" + "x" * 500), 404, "not_found")
    assert error["message"] == "There is nothing at /" + "x" * 63 + "...."


async def test_a_product_id_in_a_body_that_names_nothing_is_named_too(api: Api) -> None:
    error = assert_error(await api.reserve(123456, 1), 404, "product_not_found")
    assert error["message"] == "There is no product 123456."


# -- who is asking ----------------------------------------------------------------------------

JWT_SECRET = "the-shop-signs-its-customers-with-this-secret!!"


@pytest.mark.parametrize("sub", ["al\x00ice", "\x00", "al\ud800ice"])
async def test_a_shop_token_whose_subject_cannot_be_stored_is_401_naming_it(
    database_url: str, redis_url: str, store: Store, sub: str
) -> None:
    """The shopper's id (`shop:<sub>`) is stored with their holds: a `sub` with U+0000 or a
    lone surrogate (JSON allows both as escapes) is refused like any bad token."""
    settings = app_settings(database_url, redis_url, shopper_jwt_secret=JWT_SECRET)
    signed = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, JWT_SECRET)
    async for client in serve(settings):
        api = Api(client, store)
        product = await make_product(store, 5)
        response = await client.post(
            "/api/reservations",
            json={"productId": product.id, "quantity": 1},
            headers={"Authorization": f"Bearer {signed}"},
        )
        error = assert_error(response, 401, "unauthorized")
        assert "`sub`" in error["message"], error
        fine = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, JWT_SECRET)
        held = await client.post(
            "/api/reservations",
            json={"productId": product.id, "quantity": 1},
            headers={"Authorization": f"Bearer {fine}"},
        )
        assert held.status_code == 201, held.text
        assert (await stats(api.store, product.id)).held == 1


# -- what a webhook receiver answers ------------------------------------------------------------


def test_text_we_cannot_refuse_is_made_storable() -> None:
    assert text.storable("HTTP 500: bad\x00news", 100) == "HTTP 500: bad\ufffdnews"
    assert text.storable("lone \ud800 half", 100) == "lone \ufffd half"
    assert text.storable("x" * 600, 500) == "x" * 500
    assert text.storable("fine é 😀", 100) == "fine é 😀"


async def test_a_receivers_refusal_with_a_nul_in_it_is_recorded(store: Store) -> None:
    """What the receiver answered is kept for the console (`lastError`). A NUL in it made
    PostgreSQL refuse the transaction that records the attempt, so the failure was never
    recorded and the queue's lease just ran out, again and again."""
    receiver = Receiver()
    receiver.fail_next = 1_000
    receiver.failure_body = b"try \x00 later \xff"
    await receiver.start()
    sender = None
    try:
        endpoint = await Webhooks(store).create(url=receiver.url, events=[], description="")
        receiver.secret = endpoint.secret
        sender = Deliverer(
            store,
            timeout_s=2.0,
            backoff_s=0.05,
            retry_hours=24.0,
            poll_ms=20,
            allow_local_network=True,  # the receiver is on 127.0.0.1
        )
        sender.start()
        await hold(store, (await make_product(store, 5)).id, 1)

        async def recorded() -> list[str]:
            found = await Webhooks(store).deliveries(endpoint.id, limit=50) or []
            return [d.last_error for d in found if d.last_error and d.attempts > 0]

        errors = await eventually(recorded, what="a refusal recorded")
        assert errors[0] == "HTTP 500: try \ufffd later \ufffd", errors
    finally:
        if sender is not None:
            await sender.stop()
        await receiver.stop()


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"join","productId":3}',
        ' {\n "type" : "join" ,\t"productId" : 42 }\r\n',
        '{"type":"join","productId":2147483647}',
        '{"type":"join","productId":2147483648}',  # out of range
        '{"type":"join","productId":0}',
        '{"type":"join","productId":03}',  # not JSON
        '{"type":"join","productId":-3}',
        '{"type":"join","productId":3.0}',
        '{"type":"join","productId":"3"}',
        '{"type":"join","productId":3,"productId":4}',  # a key named twice
        '{"type":"join","type":"join","productId":3}',
        '{"productId":3,"type":"join"}',  # another order: the general path takes it
        '{"type":"join","productId":3,"extra":1}',
        '{"type":"join","productId":3}x',
        '{"type":"join","productId":3}{}',
    ],
)
def test_the_plain_join_reads_what_the_general_path_accepts_and_nothing_else(text: str) -> None:
    """The socket's shortcut for a join as the page writes it (`plain_join`) takes a text
    only when parsing it, looking for repeated keys and validating it as a `JoinMessage`
    would accept it with the same product id; anything else goes the general way."""
    try:
        parsed = from_json(text)
        accepted = repeated_key(text) is None and isinstance(parsed, dict)
        join_id = JoinMessage.model_validate(parsed).product_id if accepted else None
    except (ValueError, ValidationError):
        join_id = None
    fast = plain_join(text)
    if fast is not None:
        assert fast == join_id
    if text.lstrip().startswith('{"type":"join","productId":') and join_id is not None:
        assert fast == join_id  # the page's own form always takes the shortcut


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=20),
    st.one_of(st.none(), st.text(max_size=20)),
    st.sampled_from(list(Status)),
    st.one_of(st.none(), st.integers(0, 2**41)),
)
def test_a_hold_rendered_with_its_product_as_json_is_the_same_bytes(
    name: str, reference: str | None, status: Status, completed: int | None
) -> None:
    # The answer with a hold splices in its product's JSON, encoded once per version
    # (Catalog.view_json); it must be what encoding the whole view gives.
    product = Product(7, name, 1999, 10, 8, 3, None, 1, 2, held_units=2, max_per_shopper=5)
    hold = Reservation(
        "r" * 32, 7, 2, status, 1_700_000_000_000, 1_700_000_600_000, completed, None,
        order_reference=reference,
    )  # fmt: skip
    catalog = Catalog()
    catalog.apply(product)
    for _ in range(2):  # encoded, then as remembered
        spliced = schemas.reservation_json(hold, catalog.view_json(product), now=5)
        assert spliced == to_json(schemas.reservation_view(hold, product_view(product), now=5))


@pytest.mark.parametrize(
    ("sent", "says"),
    [("", "must be at least 1 character, not 0"), ("A" * 201, "must be at most 200 characters")],
)
def test_text_of_the_wrong_length_is_measured_in_characters(sent: str, says: str) -> None:
    # Text checked by the storable rule first was measured as a list: "Value should
    # have at least 1 item after validation, not 0." for an empty order reference.
    with pytest.raises(RequestError) as refused:
        parse_params({"orderReference": sent}, schemas.CompleteBody)
    assert str(refused.value.message).startswith(f"orderReference: {says}"), refused.value.message
    assert "item" not in refused.value.message
