"""Shoppers on the pages (issue 16), in Chromium: the shop page says the limit per customer
and how many the shopper has, offers only what they may still take, refuses politely when
another tab took the rest, and restores the shopper's holds from the server; the console
shows and edits the limit. Every state is checked with axe-core.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import Browser, Page, expect

from server.devtools.processes import Service
from tests.browser import (
    DESKTOP,
    PHONE,
    assert_accessible,
    card,
    new_product,
    open_console,
    open_shop,
    screenshot,
    serve,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(tmp_path_factory.mktemp("shoppers"))


async def options(page: Page, product: dict[str, object]) -> list[str]:
    texts: list[str] = await card(page, product).locator("select option").all_inner_texts()
    return texts


async def test_the_page_says_the_limit_and_offers_only_what_the_shopper_may_take(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Limited sneaker", 10, maxPerShopper=2)
    page = await open_shop(browser, site, PHONE)
    shop_card = card(page, product)
    limit = shop_card.locator(".limit")
    await expect(limit).to_have_text("Limit 2 per customer · you have 0")
    assert await options(page, product) == ["1", "2"]
    await assert_accessible(page)

    await shop_card.get_by_role("button", name="Reserve").click()
    await expect(page.locator(".hold", has_text="Limited sneaker")).to_be_focused()
    await expect(limit).to_have_text("Limit 2 per customer · you have 1")
    assert await options(page, product) == ["1"]

    # Another tab of the same shopper takes the last one the limit allows: this page still
    # offers it, and the server refuses politely; the page then knows.
    other = await page.context.new_page()
    await other.goto(site.base_url + "/")
    other_card = card(other, product)
    await expect(other_card.locator(".limit")).to_have_text("Limit 2 per customer · you have 1")
    await other_card.get_by_role("button", name="Reserve").click()
    await expect(other_card.locator(".limit")).to_have_text(
        "Limit 2 per customer · you have 2, the most you can"
    )
    await expect(other_card.get_by_role("button", name="Reserve")).to_be_disabled()

    await shop_card.get_by_role("button", name="Reserve").click()
    await expect(shop_card.locator(".error")).to_have_text(
        "You can hold at most 2 of these; you have 2."
    )
    await expect(limit).to_have_text("Limit 2 per customer · you have 2, the most you can")
    await expect(shop_card.get_by_role("button", name="Reserve")).to_be_disabled()
    await assert_accessible(page)
    await screenshot(page, "shop-limit-phone")

    # Another shopper (another browser) is not affected.
    stranger = await open_shop(browser, site, DESKTOP)
    await expect(card(stranger, product).locator(".limit")).to_have_text(
        "Limit 2 per customer · you have 0"
    )
    assert await options(stranger, product) == ["1", "2"]


async def test_the_page_restores_the_shoppers_holds_from_the_server(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Restored lamp", 5)
    page = await open_shop(browser, site, DESKTOP)
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(page.locator(".hold", has_text="Restored lamp")).to_be_focused()
    # The browser forgets what it stored; the shopper's cookie is all that is left.
    await page.evaluate("localStorage.clear()")
    await page.reload()
    await expect(page.locator(".hold", has_text="Restored lamp")).to_be_visible()
    await expect(card(page, product).locator(".yours")).to_have_text(
        "You hold 1 of these (see Your holds)."
    )
    # Another shopper's page shows none of them.
    stranger = await open_shop(browser, site, DESKTOP)
    await expect(stranger.locator("#products .product", has_text="Restored lamp")).to_be_visible()
    await expect(stranger.locator(".hold", has_text="Restored lamp")).to_have_count(0)


async def test_the_console_shows_and_edits_the_limit(browser: Browser, site: Service) -> None:
    product = await new_product(site, "Console-limited cap", 10, maxPerShopper=2)
    shop = await open_shop(browser, site, DESKTOP)
    page = await open_console(browser, site, DESKTOP)
    await (
        page.locator(f'#stock-rows tr[data-id="{product["id"]}"]')
        .get_by_role("button", name=product["name"])
        .click()
    )
    await expect(page.locator("#detail-limit")).to_have_text("2 (active and bought holds together)")
    await page.get_by_text("Edit name, price, start or limit per customer").click()
    edit = page.locator("#edit-form")
    field = edit.get_by_label("Limit per customer")
    await expect(field).to_have_value("2")
    await field.fill("3")
    await assert_accessible(page)
    await edit.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#detail-limit")).to_have_text("3 (active and bought holds together)")
    # Every shop page learns it at once.
    await expect(card(shop, product).locator(".limit")).to_have_text(
        "Limit 3 per customer · you have 0"
    )
    assert await options(shop, product) == ["1", "2", "3"]
    # Emptied: no limit.
    await page.get_by_text("Edit name, price, start or limit per customer").click()
    await expect(field).to_have_value("3")  # filled from the product as it opens
    await field.fill("")
    await edit.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#detail-limit")).to_have_text("None")
    await expect(card(shop, product).locator(".limit")).to_be_hidden()
    await assert_accessible(page)
