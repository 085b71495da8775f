"""The pages in a real browser: Debian's Chromium driven by Playwright, against the service
as real processes, with axe-core checking every state it is shown in.

Chromium comes from `apt-get install chromium`, axe-core from the npm registry at the version
`package-lock.json` pins (`npm ci`); `bin/test` installs both when it can. Where either is
missing the browser tests are skipped, except in CI, where that is a failure.

axe-core is read from `node_modules/` and evaluated in the page through the DevTools
protocol, which the pages' Content-Security-Policy (script-src 'self') does not govern:
the pages are checked with the policy they are served with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, ViewportSize, WebSocketRoute, expect

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import ADMIN_TOKEN, Service
from server.storage import migrate
from server.storage.database import Store
from tests.conftest import run_apart

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"

# The two sizes every page is tried at: a laptop, and a phone (an iPhone 12–15's CSS pixels).
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
SIZES = {"desktop": DESKTOP, "phone": PHONE}
# A test run at each of the sizes (its parameter `size`).
EACH_SIZE = pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
CHROMIUM_ARGS = ["--disable-gpu", "--no-sandbox", "--disable-background-networking"]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if not AXE.exists():
        return f"no axe-core at {AXE} (npm ci)"
    return None


async def assert_accessible(page: Page) -> None:
    """No axe-core violations (WCAG 2 A and AA, and axe's best practices) in the page as
    it is now, with its dynamic content rendered."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE.read_text())
    violations: list[dict[str, Any]] = await page.evaluate(
        """async () => {
            const result = await axe.run(document, { resultTypes: ["violations"] });
            return result.violations.map((v) => ({
                id: v.id,
                help: v.help,
                nodes: v.nodes.map((n) => `${n.target.join(" ")}: ${n.failureSummary}`),
            }));
        }"""
    )
    assert not violations, f"axe-core on {page.url}:\n" + json.dumps(violations, indent=2)


async def new_page(browser: Browser, size: ViewportSize, **context: Any) -> Page:
    """A page in a fresh context (its own storage) of the given viewport size."""
    browser_context = await browser.new_context(viewport=size, **context)
    return await browser_context.new_page()


async def open_shop(browser: Browser, site: Service, size: ViewportSize, **context: Any) -> Page:
    page = await new_page(browser, size, **context)
    await page.goto(site.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


async def open_console(browser: Browser, site: Service, size: ViewportSize, **context: Any) -> Page:
    """The operator console, signed in."""
    page = await new_page(browser, size, **context)
    await page.goto(site.base_url + "/admin")
    await page.get_by_label("Operator token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#console")).to_be_visible()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


def card(page: Page, product: dict[str, Any]) -> Locator:
    return page.locator(f'.product[data-id="{product["id"]}"]')


async def in_viewport(locator: Locator) -> bool:
    """Whether the element is wholly inside the window as it is scrolled now."""
    box = await locator.bounding_box()
    size = locator.page.viewport_size
    assert box is not None
    assert size is not None
    return (
        box["y"] >= 0
        and box["y"] + box["height"] <= size["height"]
        and box["x"] >= 0
        and box["x"] + box["width"] <= size["width"]
    )


async def screenshot(page: Page, name: str, *, docs: bool = False, full: bool = False) -> None:
    """The window (`full`: the whole page) into tests/artifacts/; with `docs`, also into
    docs/screenshots/ (the README's) when UPDATE_SCREENSHOTS=1, so that a test run never
    changes a file under version control by itself."""
    ARTIFACTS.mkdir(exist_ok=True)
    if full:  # from the top, or the sticky header is drawn where the window was scrolled to
        await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=full)
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=full)


# -- the service ---------------------------------------------------------------------------


def migrated_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"

    async def run() -> None:
        store = Store(url)
        await store.connect()
        await migrate.migrate(store)
        await store.close()

    run_apart(run())
    return url


def serve(work: Path, *, worker: bool = True, **settings: str) -> Iterator[Service]:
    """The whole service with a Redis of its own: two services on one Redis would share
    its job queue and its channel."""
    redis = EmbeddedRedis(work / "redis", persist=False)
    redis.start()
    service = Service(
        migrated_sqlite(work / "shop.db"),
        redis.url,
        work / "logs",
        web_concurrency=1,
        **settings,
    )
    try:
        service.start(worker=worker)
        yield service
    finally:
        service.stop()
        redis.stop()


async def new_product(site: Service, name: str, stock: int, **fields: Any) -> dict[str, Any]:
    async with site.client() as client:
        response = await client.post(
            "/api/admin/products",
            json={"name": name, "price": 12.5, "stock": stock, **fields},
            headers=site.admin_headers(),
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def reserve(site: Service, product_id: int, quantity: int = 1) -> dict[str, Any]:
    """A reservation made elsewhere: by another shopper, not this page."""
    async with site.client() as client:
        response = await client.post(
            "/api/reservations", json={"productId": product_id, "quantity": quantity}
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def act(site: Service, reservation: dict[str, Any], action: str) -> None:
    """Another shopper acts on `reservation` (`complete` or `cancel`), not this page."""
    async with site.client() as client:
        response = await client.post(f"/api/reservations/{reservation['id']}/{action}")
    assert response.status_code == 200, response.text


def size_name(size: ViewportSize) -> str:
    return "phone" if size == PHONE else "desktop"


class SocketSwitch:
    """Closes the page's WebSockets while off, passes them to the server while on."""

    def __init__(self) -> None:
        self.on = False

    async def handle(self, socket: WebSocketRoute) -> None:
        if self.on:
            socket.connect_to_server()
        else:
            await socket.close(code=4002, reason="blocked by the test")
