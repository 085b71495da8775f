"""The operator's shop API keys: make one (shown once), list them, revoke one."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.admin import operator_only
from server.api.completion import shop_keys_of
from server.api.http import PathId, RequestError, json_response, parse_body
from server.api.spec import (
    DATABASE,
    INVALID,
    NO_OPERATOR_API,
    NOT_FOUND,
    NOT_JSON,
    OPERATOR_AUTH,
    array,
    error,
    json,
    json_body,
    operation,
    path_parameter,
    ref,
)
from server.domain import errors
from server.domain.clock import iso
from server.domain.shopkeys import ShopKey
from server.wire import schemas
from server.wire.schemas import MAX_INT32, CreateShopKeyBody

KEY_ID = path_parameter(
    "key_id",
    "A shop key's id. Anything else is answered 404.",
    {"type": "integer", "minimum": 1, "maximum": MAX_INT32},
)

KEY_PATH_ID = PathId(
    "key_id",
    lambda sent: RequestError(404, NOT_FOUND, f"There is no shop key {errors.named(sent)}."),
)


def _view(key: ShopKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "createdAt": iso(key.created_at),
        "revokedAt": None if key.revoked_at is None else iso(key.revoked_at),
    }


@operation(
    "createShopKey",
    "Operator",
    "Make an API key for the shop's backend",
    {
        "201": json(ref(schemas.ShopKeySecretOut), "The key, shown this once"),
        "400": INVALID,
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "415": NOT_JSON,
        "503": DATABASE,
    },
    body=json_body(schemas.CreateShopKeyBody),
    operator=True,
    description="The shop's backend sends it as `Authorization: Bearer <key>` to complete "
    "holds (`POST /api/reservations/{{id}}/complete`). Only its SHA-256 is kept.",
)
@operator_only
async def create_key(request: Request) -> Response:
    body = await parse_body(request, CreateShopKeyBody)
    made, key = await shop_keys_of(request).create(body.name.strip() or "shop")
    return json_response({**_view(made), "key": key}, 201)


@operation(
    "listShopKeys",
    "Operator",
    "The shop API keys made in the console",
    {
        "200": json(array(schemas.ShopKeyOut), "The keys (never the keys themselves)"),
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    operator=True,
)
@operator_only
async def list_keys(request: Request) -> Response:
    return json_response([_view(k) for k in await shop_keys_of(request).all()])


@operation(
    "revokeShopKey",
    "Operator",
    "Revoke a shop API key (at once)",
    {
        "200": json(ref(schemas.ShopKeyOut), "The key, revoked"),
        **OPERATOR_AUTH,
        "404": error("There is no such key, or no operator API", NOT_FOUND),
        "503": DATABASE,
    },
    parameters=[KEY_ID],
    operator=True,
)
@operator_only
async def revoke_key(request: Request) -> Response:
    revoked = await KEY_PATH_ID.load(request, shop_keys_of(request).revoke)
    return json_response(_view(revoked))


routes = [
    Route("/api/admin/shop-keys", create_key, methods=["POST"]),
    Route("/api/admin/shop-keys", list_keys, methods=["GET"]),
    Route("/api/admin/shop-keys/{key_id}/revoke", revoke_key, methods=["POST"]),
]
