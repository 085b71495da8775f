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
    "The database answers within a second (and Redis, or the status is `degraded`)",
    {
        "200": json(
            ref(schemas.HealthOut),
            "Ready; `degraded` when Redis does not answer (the sale goes on without it)",
        ),
        "503": json(
            ref(schemas.HealthOut),
            "Not ready: the database does not answer",
            {"Retry-After": RETRY_AFTER},
        ),
    },
)
async def readyz(request: Request) -> Response:
    """Ready (200) when the database answers within a second; `degraded` (still 200) when
    only Redis does not; 503 when the database does not.

    Redis is not needed to sell: holds are made and ended in the database, expiry jobs
    lost meanwhile are covered by the sweeper, and pages catch up on reconnect. A Redis
    outage or failover hits every process at once, so taking them all out of the load
    balancer for it would only turn a sale that goes on into 503s and make every page
    reconnect (seen in the cluster drills, cluster/drills.py)."""
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
    if checks["database"] != "ok":
        return json_response(
            {"status": "unavailable", "checks": checks}, 503, headers={"Retry-After": "5"}
        )
    status = "ok" if checks["redis"] == "ok" else "degraded"
    return json_response({"status": status, "checks": checks})


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
