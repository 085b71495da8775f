"""A shop's webhook receiver for the benchmark: answers 204 at once and keeps, per request,
the webhook-id, the arrival time and the event's own timestamp (its commit time), served
back on `GET /stats`. Run as its own process (`python -m uvicorn bench.receiver:app`), so
that it does not share a core's event loop with what it measures. It does not verify the
signatures (the tests do, with the library, on every request); it reads them, as a shop's
receiver would have them at hand."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.domain.clock import parse_iso

_seen: list[tuple[str, int, int, str]] = []


async def hook(request: Request) -> Response:
    body = await request.body()
    arrived = time.time_ns() // 1_000_000
    event: dict[str, Any] = json.loads(body)
    assert request.headers["webhook-signature"].startswith("v1,")
    _seen.append(
        (request.headers["webhook-id"], arrived, parse_iso(event["timestamp"]), event["type"])
    )
    return Response(status_code=204)


async def stats(request: Request) -> Response:
    return JSONResponse(_seen)


async def reset(request: Request) -> Response:
    _seen.clear()
    return Response(status_code=204)


app = Starlette(
    routes=[
        Route("/hooks", hook, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/reset", reset, methods=["POST"]),
    ]
)
