"""The baseline: a bare Starlette JSON endpoint, served with the same uvicorn settings as the
service, so that every figure can be reported as a share of what this machine can do."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


app = Starlette(routes=[Route("/", hello)])
