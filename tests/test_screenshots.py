"""The README's screenshots: the pages' main states on a shop that looks like a real sale
(the demo catalogue, other shoppers holding and buying), at a laptop's and a phone's size.

Each state is checked (what it shows, and axe-core) before it is photographed. The pictures
go to tests/artifacts/; `UPDATE_SCREENSHOTS=1 bin/test tests/test_screenshots.py` also
writes them into docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from server.devtools.demo import PRODUCTS
from server.devtools.processes import Service
from tests.browser import (
    DESKTOP,
    PHONE,
    assert_accessible,
    card,
    new_product,
    open_console,
    open_shop,
    reserve,
    screenshot,
    serve,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def showcase(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(tmp_path_factory.mktemp("showcase"))


async def demo_sale(site: Service) -> dict[str, dict[str, Any]]:
    """The demo catalogue, a sale under way: most of the shoes gone, the art prints all
    held by others, some headphones sold, and the watch starting tomorrow evening."""
    products = {}
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=18, minute=0, second=0, microsecond=0
    )
    for demo in PRODUCTS:  # the watch without its waiting room: a sale that starts later
        fields = {"saleStartsAt": tomorrow.isoformat()} if demo.starts_in is not None else {}
        products[demo.name] = await new_product(
            site, demo.name, demo.stock, price=demo.cents / 100, **fields
        )
    shoes = products["Aurora running shoes"]["id"]
    for _ in range(6):
        await reserve(site, shoes, 8)
    for _ in range(5):
        await reserve(site, products["Signed art print"]["id"], 1)
    async with site.client() as client:
        for _ in range(3):
            held = await reserve(site, products["Studio headphones"]["id"], 2)
            await client.post(f"/api/reservations/{held['id']}/complete")
    return products


async def test_the_main_states_for_the_readme(browser: Browser, showcase: Service) -> None:
    products = await demo_sale(showcase)
    shoes = products["Aurora running shoes"]
    headphones = products["Studio headphones"]

    for size, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = await open_shop(browser, showcase, size, locale="en-GB", timezone_id="Europe/Paris")
        await expect(card(page, shoes).locator(".count")).to_have_text("2 of 50 left")
        await expect(page.locator("#soon .product")).to_have_count(1)
        await card(page, headphones).get_by_role("button", name="Reserve").click()
        hold = page.locator(".hold", has_text="Studio headphones")
        await expect(hold).to_be_focused()
        await expect(hold.locator(".cost")).to_have_text("€199.00 each · Total €199.00")
        await page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
        await assert_accessible(page)
        await screenshot(page, f"shop-{name}", docs=True)

    console = await open_console(
        browser, showcase, DESKTOP, locale="en-GB", timezone_id="Europe/Paris"
    )
    row = console.locator(f'#stock-rows tr[data-id="{shoes["id"]}"]')
    await row.get_by_role("button", name="Aurora running shoes").click()
    # Other shoppers hold the last two while the console watches: the chart moves.
    await reserve(showcase, shoes["id"], 1)
    await expect(row.locator(".held")).to_have_text("49")
    await reserve(showcase, shoes["id"], 1)
    await expect(row.locator(".held")).to_have_text("50")
    await expect(console.locator("#chart polyline")).to_have_count(3)
    await expect(console.locator("#detail-now")).to_have_text(
        re.compile(r"^0 available \+ 50 held \+ 0 sold = 50$")
    )
    await console.evaluate("document.activeElement.blur()")
    await assert_accessible(console)
    await screenshot(console, "admin-desktop", docs=True, full=True)

    phone_console = await open_console(
        browser, showcase, PHONE, locale="en-GB", timezone_id="Europe/Paris"
    )
    await expect(phone_console.locator("#hold-rows tr").first).to_be_visible()
    await assert_accessible(phone_console)
    await screenshot(phone_console, "admin-phone", docs=True)

    # The shop gone: the page says so and marks what it shows.
    offline = await open_shop(browser, showcase, PHONE, locale="en-GB", timezone_id="Europe/Paris")
    await asyncio.to_thread(showcase.web.stop)
    try:
        await expect(offline.locator("#connection")).to_have_attribute(
            "data-state", "offline", timeout=15_000
        )
        await assert_accessible(offline)
        await screenshot(offline, "shop-offline-phone", docs=True)
    finally:
        await asyncio.to_thread(showcase.web.start)
        await asyncio.to_thread(showcase.wait_ready)
