"""The OpenAPI document (`/api/openapi.json`) and its reference page (`/api/docs`).

The document is checked three ways: it is valid OpenAPI 3.1, it names every route the app
serves (so a new route cannot be left out), and the real service, fuzzed by schemathesis
from it, answers only what it says: no 5xx, documented status codes, content types,
headers and bodies.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation.case import Case
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.routing import Mount, Route, WebSocketRoute

from server.api.app import create_app
from server.api.openapi import document
from server.api.pages import SECURITY_HEADERS
from server.api.spec import RESERVATION_ID_PATTERN
from server.devtools.processes import Service, running
from server.domain.clock import now_ms
from server.domain.inventory import is_reservation_id, new_reservation_ids
from server.infra.settings import Settings
from server.live import hub as live
from server.wire.schemas import WatchMessage
from tests.support import serve

Operation = APIOperation[Any, Any, Any, Any]
MAX_QUANTITY = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Everything the document says, for every operation, within a bounded number of requests a
# database: REQUEST_BUDGET shared by the operations (so that the run does not grow with the
# API), at least MIN_EXAMPLES of each kind an operation, in these shares: valid requests,
# invalid ones, then text no database could store in one string of a valid request (issue 15:
# a NUL anywhere, a lone surrogate (bodies only: a URL or a header cannot carry one, as a
# client's library encodes them as UTF-8, and the server decodes `%ED%A0%80` as U+FFFD), or a
# value far past any field's limit).
REQUEST_BUDGET = 1_000
MIN_EXAMPLES = 4
SHARES = {"positive": 0.4, "negative": 0.3, "hostile": 0.3}
MODES = {"positive": GenerationMode.POSITIVE, "negative": GenerationMode.NEGATIVE}
NUL_TEXT = ["\x00", "\x00{}", "{}\x00", "{}\x00{}", "\x00" * 300]
SURROGATE_TEXT = ["\ud800", "{}\udfff", "\udbff{}", "{}\ud800\udc00\ud800"]
LONG_TEXT = ["{}" + "x" * 10_000, "é" * 3_000, "{}" + "\x00" * 7_000]


def _document() -> bytes:
    """The document of an app with MAX_QUANTITY settings (nothing is started)."""
    settings = Settings(admin_token="x", redis_url="redis://unused", max_quantity=MAX_QUANTITY)
    return document(create_app(settings))


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    parsed: dict[str, Any] = from_json(_document())
    return parsed


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in spec["paths"].items() for method in item}


# -- the document ----------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    OPENAPI_31_VALIDATOR.validate(spec)
    for name, schema in spec["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for ref in set(_refs(spec)):
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node[part]
        assert isinstance(node, dict), ref
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    schemathesis.openapi.from_dict(spec).validate()


def test_every_operator_operation_documents_the_token_and_its_throttle(
    spec: dict[str, Any],
) -> None:
    """Each /api/admin operation can answer 401 (no or a wrong token) and 429 (too many wrong
    tokens from this client: `operator_only`), so its document lists both."""
    missing = [
        (method.upper(), path, status)
        for path, item in spec["paths"].items()
        if path.startswith("/api/admin/")
        for method, op in item.items()
        for status in ("401", "429")
        if status not in op["responses"]
    ]
    assert missing == []


def test_every_route_the_app_serves_is_documented(spec: dict[str, Any]) -> None:
    app = create_app(Settings(admin_token="x", redis_url="redis://unused"))
    served: set[tuple[str, str]] = set()
    sockets = []
    endpoints = {
        (r.path, m): r.endpoint for r in app.routes if isinstance(r, Route) for m in r.methods or ()
    }
    for route in app.routes:
        if isinstance(route, Route) and not route.include_in_schema:
            # The shopper API at the root: the same endpoint as under /api, documented once.
            for m in route.methods or ():
                assert endpoints[("/api" + route.path, m)] is route.endpoint, route.path
            continue
        if isinstance(route, Route):
            methods = route.methods or {"GET"}
            # HEAD comes with every GET, by Starlette; it is not an operation of its own.
            served |= {(route.path, m) for m in methods if m != "HEAD"}
        elif isinstance(route, Mount):
            served.add((route.path + "/{path}", "GET"))
        elif isinstance(route, WebSocketRoute):
            sockets.append(route.path)
        else:
            pytest.fail(f"a route of a kind this test does not know: {route!r}")
    assert served == _operations(spec)
    assert sockets == [spec["x-websocket"]["path"]]


def test_every_error_response_is_an_error_out(spec: dict[str, Any]) -> None:
    error = "#/components/schemas/ErrorOut"
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": error}, (method, path, status)
                    assert schema["allOf"][1]["properties"]["code"]["enum"]
            assert "413" in operation["responses"], (method, path)


def test_what_the_document_declares_agrees_with_the_service(spec: dict[str, Any]) -> None:
    for reservation_id in [*new_reservation_ids(20, now=now_ms()), "a" * 22]:
        assert is_reservation_id(reservation_id)
        assert re.fullmatch(RESERVATION_ID_PATTERN, reservation_id)
    for text in ["a" * 21, "a" * 23, "a" * 29, "a" * 31, "a" * 29 + "!", "ä" * 22]:
        assert not is_reservation_id(text)
        assert not re.fullmatch(RESERVATION_ID_PATTERN, text)
    watch = WatchMessage.model_json_schema()["properties"]["reservations"]
    assert watch["maxItems"] == live.MAX_WATCHED
    reserve = spec["components"]["schemas"]["ReserveBody"]["properties"]["quantity"]
    assert reserve["maximum"] == MAX_QUANTITY


# -- served, in process --------------------------------------------------------------------


@pytest.fixture
async def client(database_url: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, redis_url=redis_url, max_quantity=MAX_QUANTITY)
    async for client in serve(settings):
        yield client


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_document_is_served_as_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == _document()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_reference_page_loads_only_same_origin_files(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/api/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts, "the page has its script"
    files = []
    for attributes, body in scripts:
        assert not body.strip(), "no inline script: the CSP would refuse it"
        (src,) = re.findall(r'\bsrc="([^"]+)"', attributes)
        files.append(src)
    files += re.findall(r'<link\b[^>]*\bhref="([^"]+)"', html)
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    for src in files:
        assert src.startswith("/"), src
        assert not src.startswith("//"), src
        served = await client.get(src)
        assert served.status_code == 200, src
    script = (await client.get("/static/js/api-docs.js")).text
    assert "innerHTML" not in script
    assert re.findall(r"fetch\(\"([^\"]+)\"", script) == ["/api/openapi.json"]


# -- the real service, fuzzed from its document ----------------------------------------------


@pytest.fixture
def service(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Service]:
    with running(
        database_url,
        redis_url,
        tmp_path / "logs",
        web_concurrency=1,
        MAX_QUANTITY=str(MAX_QUANTITY),
    ) as service:
        yield service


@st.composite
def _hostile(draw: st.DrawFn, operation: Operation, headers: dict[str, str]) -> Case[Operation]:
    """A valid request to `operation` with one of its strings (or ids) made hostile."""
    case: Case[Operation] = draw(operation.as_strategy(GenerationMode.POSITIVE, headers=headers))
    spots: list[tuple[Any, Any, bool]] = []  # (container, key, is it in the body)

    def strings(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, str):
                spots.append((node, key, True))
            elif isinstance(value, dict | list):
                strings(value)

    if isinstance(case.body, dict | list):
        strings(case.body)
    for part in (case.query, case.path_parameters, case.headers):
        for key in part or {}:
            if key.lower() not in ("authorization", "content-type", "content-length"):
                spots.append((part, key, False))
    if not spots:
        return case
    container, key, in_body = draw(st.sampled_from(spots))
    kinds = [NUL_TEXT, LONG_TEXT, *([SURROGATE_TEXT] if in_body else [])]
    shape = draw(st.sampled_from(draw(st.sampled_from(kinds))))
    container[key] = shape.replace("{}", str(container[key]), 1).replace("{}", "")
    return case


def _examples(operations: int) -> dict[str, int]:
    """Requests of each kind per operation, for `operations` of them."""
    each = REQUEST_BUDGET / operations
    return {kind: max(MIN_EXAMPLES, round(each * share)) for kind, share in SHARES.items()}


def _fuzz_hostile(service: Service, operation: Operation, examples: int) -> None:
    """`examples` requests with hostile text: each answered 4xx in the error shape (or as
    documented), never 5xx, never with the connection cut (`call` would raise)."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_hostile(operation, service.admin_headers()))
    def fuzz(case: Case[Operation]) -> None:
        response = case.call(base_url=service.base_url, timeout=10)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert response.headers["content-type"] == ["application/json"], response.headers
            body = response.json()
            assert body["statusCode"] == response.status_code, body
            assert body["code"], body
            assert body["message"], body

    try:
        fuzz()
    except Exception as exc:
        exc.add_note(f"{operation.label} (hostile text)\n{service.logs()}")
        raise


def _fuzz(
    service: Service, operation: Operation, mode: GenerationMode, examples: int, **fixed: Any
) -> None:
    """Up to `examples` requests to `operation`, each checked against the document."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(mode, headers=service.admin_headers(), path_parameters=fixed))
    def fuzz(case: Case[Operation]) -> None:
        case.call_and_validate(base_url=service.base_url, checks=CHECKS, timeout=10)

    try:
        fuzz()
    except Exception as exc:
        exc.add_note(f"{operation.label} ({mode.value}, {fixed})\n{service.logs()}")
        raise


@pytest.mark.slow
# Bounded by its request budget, not by a clock: each request has its own 10 s timeout, which
# catches a hung service; the 120 s that every other test gets failed this one, a thousand
# requests with their data generated, at load averages of 15-25 (two slow processes beside
# other suites), where it took over 2 min.
@pytest.mark.timeout(900)
def test_the_service_answers_as_its_document_says(service: Service) -> None:
    with httpx.Client(base_url=service.base_url, headers=service.admin_headers()) as http:
        # Something to find, besides what the generated cases make.
        created = http.post("/api/admin/products", json={"name": "Fuzz", "price": 1, "stock": 5})
        assert created.status_code == 201, created.text
        product_id = created.json()["id"]
        held = http.post("/api/reservations", json={"productId": product_id, "quantity": 1})
        assert held.status_code == 201, held.text
        raw = http.get("/api/openapi.json").json()
    known = {
        "product_id": product_id,
        "reservation_id": held.json()["id"],
        "path": "css/shop.css",
    }
    schema = schemathesis.openapi.from_dict(raw)
    started = time.monotonic()
    tested = set()
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operations.append(result.ok())
    examples = _examples(len(operations))
    for operation in operations:
        for kind, mode in MODES.items():
            _fuzz(service, operation, mode, examples[kind])
        _fuzz_hostile(service, operation, examples["hostile"])
        # An existing product or hold, with everything else generated: complete runs before
        # cancel, so the hold goes ACTIVE → COMPLETED, and cancel gets its 409.
        fixed = {p.name: known[p.name] for p in operation.path_parameters.items if p.name in known}
        if fixed:
            _fuzz(service, operation, GenerationMode.POSITIVE, MIN_EXAMPLES, **fixed)
        tested.add((operation.path, operation.method.upper()))
    assert tested == _operations(raw)
    # Nothing any of it sent left the books wrong: every product still adds up.
    with httpx.Client(base_url=service.base_url, headers=service.admin_headers()) as http:
        books = http.get("/api/admin/reconcile", timeout=30)
    assert books.status_code == 200, books.text
    assert books.json()["ok"], books.text
    # The run is bounded by its request budget, not by a clock (a busy machine must not fail
    # it); its time is printed for the README's figure.
    took = time.monotonic() - started
    print(f"fuzzed {len(tested)} operations, {examples} each, in {took:.1f} s")
