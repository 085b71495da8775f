"""The service's own endpoints: liveness and readiness.

These two are never refused for overload (`server.api.middleware.NEVER_REFUSED`): a probe
must get an answer from a process that is busy serving shoppers. Prometheus metrics are not
here: they have a port of their own, `WEB_METRICS_PORT` (server/infra/metrics.py).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.http import json_response, shop_of
from server.api.spec import RETRY_AFTER, json, operation, ref
from server.wire import schemas


@operation(
    "health",
    "Service",
    "The process is up",
    {"200": json(ref(schemas.HealthOut), "Up")},
)
async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


@operation(
    "readiness",
    "Service",
    "The database and Redis both answer, each within a second",
    {
        "200": json(ref(schemas.HealthOut), "Ready"),
        "503": json(
            ref(schemas.HealthOut),
            "Not ready: `checks` says which one failed",
            {"Retry-After": RETRY_AFTER},
        ),
    },
)
async def readyz(request: Request) -> Response:
    """Ready when the database and Redis both answer, each within a second."""
    checks = {}
    for name, probe in (
        ("database", shop_of(request).store.ping()),
        ("redis", request.app.state.redis.ping()),
    ):
        try:
            await asyncio.wait_for(probe, 1.0)
            checks[name] = "ok"
        except Exception as exc:  # any failure at all means "not ready"
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return json_response({"status": "ok", "checks": checks})
    return json_response(
        {"status": "unavailable", "checks": checks}, 503, headers={"Retry-After": "5"}
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
