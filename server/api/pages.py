"""The pages: the shop at `/`, the operator console at `/admin`, their files under /static.

Plain HTML, CSS and JavaScript modules from `static/`: no build step, nothing from another
site, so they work offline. They are served with a Content-Security-Policy that allows
only this origin, which also means no inline script can ever run on them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.api.spec import NOT_FOUND, Described, error, header, operation, path_parameter

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


def page_operation(operation_id: str, summary: str) -> Callable[[Described], Described]:
    """The OpenAPI description of an HTML page, served with `SECURITY_HEADERS`."""
    page = {
        "description": "An HTML page",
        "content": {"text/html": {"schema": {"type": "string"}}},
        "headers": {name: header(f"`{value}`") for name, value in SECURITY_HEADERS.items()},
    }
    return operation(operation_id, "Pages", summary, {"200": page})


@page_operation("shopPage", "The shop")
async def shop_page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


@page_operation("operatorPage", "The operator console")
async def admin_page(request: Request) -> Response:
    return FileResponse(STATIC / "admin.html", headers=SECURITY_HEADERS)


static_files = operation(
    "staticFile",
    "Pages",
    "The pages' files: scripts, styles, images",
    {
        "200": {"description": "The file", "content": {"*/*": {}}},
        "404": error("There is no such file", NOT_FOUND),
    },
    parameters=[path_parameter("path", "The file's path under static/.", {"type": "string"})],
)(StaticFiles(directory=STATIC))

routes = [
    Route("/", shop_page, methods=["GET"]),
    Route("/admin", admin_page, methods=["GET"]),
    Mount("/static", static_files, name="static"),
]
