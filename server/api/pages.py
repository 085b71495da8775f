"""The pages: the shop at `/`, the operator console at `/admin`, their files under /static.

Plain HTML, CSS and JavaScript modules from `static/`: no build step, nothing from another
site, so they work offline. They are served with a Content-Security-Policy that allows
only this origin, which also means no inline script can ever run on them.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[2] / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


async def shop_page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


async def admin_page(request: Request) -> Response:
    return FileResponse(STATIC / "admin.html", headers=SECURITY_HEADERS)


routes = [
    Route("/", shop_page, methods=["GET"]),
    Route("/admin", admin_page, methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]
