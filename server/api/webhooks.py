"""The operator's webhook endpoints: register, list, enable/disable, rotate the secret,
recent deliveries, redeliver one, delete one. Only with the operator token
(`operator_only`)."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.admin import operator_only
from server.api.http import (
    PathId,
    RequestError,
    json_response,
    parse_body,
    parse_params,
    path_sent,
    shown,
)
from server.api.spec import (
    DATABASE,
    INVALID,
    INVALID_REQUEST,
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
    query_parameters,
    ref,
)
from server.domain import errors, webhooks
from server.domain.clock import iso
from server.domain.webhooks import Delivery, Endpoint
from server.service.resolver import local_host
from server.service.webhooks import Webhooks
from server.wire import schemas
from server.wire.schemas import MAX_INT32, CreateWebhookBody, FieldError

ENDPOINT_ID = path_parameter(
    "endpoint_id",
    "A webhook endpoint's id. Anything else is answered 404.",
    {"type": "integer", "minimum": 1, "maximum": MAX_INT32},
)
EVENT_ID = path_parameter(
    "event_id",
    "An event's id (its webhook-id).",
    {"type": "string", "pattern": "^msg_[a-z2-7]{26}$"},
)
NO_ENDPOINT = error("There is no such endpoint, or no operator API", NOT_FOUND)
TOO_MANY_ENDPOINTS = "too_many_webhook_endpoints"
TOO_MANY = error(
    f"{webhooks.MAX_ENABLED_ENDPOINTS} endpoints are enabled already: disable one first",
    TOO_MANY_ENDPOINTS,
)
BEING_DELETED_CODE = "webhook_endpoint_being_deleted"
BEING_DELETED = error(
    "The endpoint is being deleted (listed `being deleted`): DELETE it again to finish",
    BEING_DELETED_CODE,
)
ENDPOINT = json(ref(schemas.WebhookOut), "The endpoint")


def webhooks_of(request: Request) -> Webhooks:
    found: Webhooks = request.app.state.webhooks
    return found


ENDPOINT_PATH_ID = PathId(
    "endpoint_id",
    lambda sent: RequestError(
        404, NOT_FOUND, f"There is no webhook endpoint {errors.named(sent)}."
    ),
)


def _no_delivery(request: Request) -> RequestError:
    """404 naming the event and the endpoint the caller sent."""
    event = errors.named(shown(request.path_params["event_id"]))
    endpoint = errors.named(path_sent(request, "endpoint_id"))
    return RequestError(
        404, NOT_FOUND, f"There is no delivery of event {event} to webhook endpoint {endpoint}."
    )


def _view(endpoint: Endpoint, *, secret: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "events": list(endpoint.events),
        "enabled": endpoint.enabled,
        "disabledReason": endpoint.disabled_reason,
        "createdAt": iso(endpoint.created_at),
        "pending": endpoint.pending,
        "failingSince": None if endpoint.failing_since is None else iso(endpoint.failing_since),
    }
    if secret:
        view["secret"] = endpoint.secret
    return view


def _delivery_view(d: Delivery) -> dict[str, Any]:
    def time(ms: int | None) -> str | None:
        return None if ms is None else iso(ms)

    return {
        "eventId": d.event_id,
        "type": d.type,
        "productId": d.product_id,
        "createdAt": iso(d.created_at),
        "status": d.status,
        "attempts": d.attempts,
        "lastAttemptAt": time(d.last_attempt_at),
        "lastStatus": d.last_status,
        "lastError": d.last_error,
        "deliveredAt": time(d.delivered_at),
    }


def _too_many() -> RequestError:
    """409 `too_many_webhook_endpoints`: creating or enabling one would pass the limit."""
    return RequestError(
        409,
        TOO_MANY_ENDPOINTS,
        f"At most {webhooks.MAX_ENABLED_ENDPOINTS} webhook endpoints may be enabled at once: "
        "disable one first.",
    )


def _being_deleted(endpoint_id: int) -> RequestError:
    """409 `webhook_endpoint_being_deleted`: enabling, disabling or rotating the secret of
    an endpoint whose delete is under way, or stopped half-way (it was answered 404 about an
    endpoint still listed, or 200 with a secret for an endpoint about to go)."""
    return RequestError(
        409,
        BEING_DELETED_CODE,
        f"Webhook endpoint {endpoint_id} is being deleted, so it can be neither enabled, "
        "disabled nor given a new secret; "
        f"DELETE /api/admin/webhooks/{endpoint_id} again to finish deleting it.",
    )


def _refuse_local_host(url: str) -> None:
    """Refuse (400 `invalid_request`, field `url`) a URL whose host is plainly on the local
    network: an IP address off the public Internet or `localhost`. A name that resolves to
    such an address is refused by the worker when it connects (server/service/resolver.py)."""
    kind = local_host(httpx.URL(url).host)
    if kind is not None:
        message = (
            f"names {kind}: webhooks go to the local network only with "
            "WEBHOOK_ALLOW_LOCAL_NETWORK=true"
        )
        raise RequestError(
            400, "invalid_request", f"url: {message}.", [FieldError(field="url", message=message)]
        )


@operation(
    "createWebhookEndpoint",
    "Webhooks",
    "Register a webhook endpoint",
    {
        "201": json(
            ref(schemas.WebhookSecretOut),
            "The endpoint, with its signing secret: shown this once",
        ),
        "400": INVALID,
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "409": TOO_MANY,
        "415": NOT_JSON,
        "503": DATABASE,
    },
    body=json_body(schemas.CreateWebhookBody),
    operator=True,
    description="The endpoint gets every event committed from now on (or the `events` "
    "listed), signed with the secret returned here (Standard Webhooks).",
)
@operator_only
async def create_endpoint(request: Request) -> Response:
    body = await parse_body(request, CreateWebhookBody)
    if not request.app.state.settings.webhook_allow_local_network:
        _refuse_local_host(body.url)
    try:
        endpoint = await webhooks_of(request).create(
            url=body.url, events=sorted(set(body.events)), description=body.description
        )
    except webhooks.TooManyEndpoints:
        raise _too_many() from None
    return json_response(_view(endpoint, secret=True), 201)


@operation(
    "listWebhookEndpoints",
    "Webhooks",
    "Every webhook endpoint",
    {
        "200": json(array(schemas.WebhookOut), "The endpoints, by id (no secrets)"),
        **OPERATOR_AUTH,
        "404": NO_OPERATOR_API,
        "503": DATABASE,
    },
    operator=True,
)
@operator_only
async def list_endpoints(request: Request) -> Response:
    return json_response([_view(e) for e in await webhooks_of(request).all()])


@operation(
    "getWebhookEndpoint",
    "Webhooks",
    "One webhook endpoint",
    {"200": ENDPOINT, **OPERATOR_AUTH, "404": NO_ENDPOINT, "503": DATABASE},
    parameters=[ENDPOINT_ID],
    operator=True,
)
@operator_only
async def get_endpoint(request: Request) -> Response:
    endpoint = await ENDPOINT_PATH_ID.load(request, webhooks_of(request).get)
    return json_response(_view(endpoint))


def _switch(enabled: bool) -> Any:
    async def switch(request: Request) -> Response:
        try:
            endpoint = await webhooks_of(request).set_enabled(ENDPOINT_PATH_ID.id(request), enabled)
        except webhooks.TooManyEndpoints:
            raise _too_many() from None
        except webhooks.EndpointBeingDeleted as exc:
            raise _being_deleted(exc.endpoint_id) from None
        return json_response(_view(ENDPOINT_PATH_ID.found(request, endpoint)))

    return switch


enable_endpoint = operation(
    "enableWebhookEndpoint",
    "Webhooks",
    "Enable an endpoint (its waiting deliveries go at once)",
    {
        "200": ENDPOINT,
        **OPERATOR_AUTH,
        "404": NO_ENDPOINT,
        "409": error(
            f"{webhooks.MAX_ENABLED_ENDPOINTS} endpoints are enabled already: disable one "
            "first; or the endpoint is being deleted: DELETE it again to finish",
            TOO_MANY_ENDPOINTS,
            BEING_DELETED_CODE,
        ),
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID],
    operator=True,
)(operator_only(_switch(True)))
disable_endpoint = operation(
    "disableWebhookEndpoint",
    "Webhooks",
    "Disable an endpoint (it gets no new events until enabled)",
    {
        "200": ENDPOINT,
        **OPERATOR_AUTH,
        "404": NO_ENDPOINT,
        "409": BEING_DELETED,
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID],
    operator=True,
)(operator_only(_switch(False)))


@operation(
    "rotateWebhookSecret",
    "Webhooks",
    "Give an endpoint a new signing secret",
    {
        "200": json(
            ref(schemas.WebhookSecretOut),
            "The endpoint with its new secret, shown this once; the secret it replaces "
            "signs too for a day, and so does one rotated out earlier while its day lasts "
            "(up to three signatures in webhook-signature)",
        ),
        **OPERATOR_AUTH,
        "404": NO_ENDPOINT,
        "409": BEING_DELETED,
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID],
    operator=True,
    description="Each secret rotated out keeps signing for a day, so rotating twice in a day "
    "leaves the first one working for a receiver not yet updated. At most three secrets "
    "sign at once: a third rotation within a day stops the oldest at once.",
)
@operator_only
async def rotate_secret(request: Request) -> Response:
    try:
        endpoint = await ENDPOINT_PATH_ID.load(request, webhooks_of(request).rotate)
    except webhooks.EndpointBeingDeleted as exc:
        raise _being_deleted(exc.endpoint_id) from None
    return json_response(_view(endpoint, secret=True))


# Beyond an attempt's timeout, how long a deletion waits for the workers to stop sending.
DELETE_MARGIN_S = 2.0


@operation(
    "deleteWebhookEndpoint",
    "Webhooks",
    "Delete an endpoint, with its deliveries",
    {
        "204": {"description": "Deleted: nothing more is sent to it"},
        **OPERATOR_AUTH,
        "404": NO_ENDPOINT,
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID],
    operator=True,
    description="Its deliveries still waiting are dropped, never sent, and its delivery "
    "history goes with it; its events stay for the other endpoints. Nothing is sent to it "
    "after the 204: the endpoint is disabled first, and the answer waits until the workers "
    "have stopped sending to it (within WEBHOOK_TIMEOUT_SECONDS plus 2 s; an attempt already "
    "on the wire may end meanwhile). Meanwhile it is listed disabled, `being deleted`, and "
    "cannot be enabled.",
)
@operator_only
async def delete_endpoint(request: Request) -> Response:
    wait_s = request.app.state.settings.webhook_timeout_seconds + DELETE_MARGIN_S
    endpoint_id = ENDPOINT_PATH_ID.id(request)
    if not await webhooks_of(request).delete(endpoint_id, wait_s=wait_s):
        raise ENDPOINT_PATH_ID.not_found(request)
    return Response(status_code=204)


class DeliveryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    limit: Annotated[int, Field(ge=1, le=500, description="How many, newest first.")] = 50


@operation(
    "listWebhookDeliveries",
    "Webhooks",
    "An endpoint's recent deliveries, newest first",
    {
        "200": json(array(schemas.DeliveryOut), "Its deliveries, with their status"),
        "400": error("A query parameter is invalid or unknown", INVALID_REQUEST),
        **OPERATOR_AUTH,
        "404": NO_ENDPOINT,
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID, *query_parameters(DeliveryQuery)],
    operator=True,
)
@operator_only
async def list_deliveries(request: Request) -> Response:
    query = parse_params(request.query_params, DeliveryQuery)
    found = await webhooks_of(request).deliveries(ENDPOINT_PATH_ID.id(request), limit=query.limit)
    return json_response([_delivery_view(d) for d in ENDPOINT_PATH_ID.found(request, found)])


@operation(
    "redeliverWebhook",
    "Webhooks",
    "Send one event to an endpoint again",
    {
        "202": {"description": "The worker sends it within a moment (same webhook-id)"},
        **OPERATOR_AUTH,
        "404": error("There is no such delivery, or no operator API", NOT_FOUND),
        "503": DATABASE,
    },
    parameters=[ENDPOINT_ID, EVENT_ID],
    operator=True,
    description="A delivered event is sent once more on its own; one still waiting has its "
    "retry brought forward to now.",
)
@operator_only
async def redeliver(request: Request) -> Response:
    event_id: str = request.path_params["event_id"]
    if not (event_id.startswith("msg_") and len(event_id) == 30 and event_id.isascii()):
        raise _no_delivery(request)
    if not await webhooks_of(request).redeliver(ENDPOINT_PATH_ID.id(request), event_id):
        raise _no_delivery(request)
    return Response(status_code=202)


routes = [
    Route("/api/admin/webhooks", create_endpoint, methods=["POST"]),
    Route("/api/admin/webhooks", list_endpoints, methods=["GET"]),
    Route("/api/admin/webhooks/{endpoint_id}", get_endpoint, methods=["GET"]),
    Route("/api/admin/webhooks/{endpoint_id}", delete_endpoint, methods=["DELETE"]),
    Route("/api/admin/webhooks/{endpoint_id}/enable", enable_endpoint, methods=["POST"]),
    Route("/api/admin/webhooks/{endpoint_id}/disable", disable_endpoint, methods=["POST"]),
    Route("/api/admin/webhooks/{endpoint_id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/api/admin/webhooks/{endpoint_id}/deliveries", list_deliveries, methods=["GET"]),
    Route(
        "/api/admin/webhooks/{endpoint_id}/deliveries/{event_id}/redeliver",
        redeliver,
        methods=["POST"],
    ),
]
