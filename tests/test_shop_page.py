"""The shop page as a shopper meets it in a real sale, at a laptop's and a phone's size:
the hold always in view, what "sold out" means, what is coming, what happens when the shop
cannot be reached, and what the page says and announces. Every state is checked with axe-core.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, ViewportSize, expect
from pydantic_core import to_json
from redis.asyncio import Redis

from server.devtools.processes import Service
from server.infra.keys import events_channel
from tests.browser import (
    EACH_SIZE,
    PHONE,
    SIZES,
    SocketSwitch,
    act,
    assert_accessible,
    card,
    in_viewport,
    new_page,
    new_product,
    open_shop,
    reserve,
    screenshot,
    serve,
    size_name,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

COUNTDOWN = r"0[12]:\d\d"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(tmp_path_factory.mktemp("shop"))


async def fillers(site: Service, count: int) -> None:
    """Products enough to make a long page (a real sale's list)."""
    for n in range(count):
        await new_product(site, f"Filler {n}", 20)


# -- 1. the hold always in view --------------------------------------------------------------


@EACH_SIZE
async def test_the_new_hold_stays_in_view_focused_with_its_countdown_and_buy_button(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    await fillers(site, 6)
    product = await new_product(site, "Last-units lamp", 2)
    page = await open_shop(browser, site, size)
    assert await page.title() == "Flash sale"
    shop_card = card(page, product)
    await shop_card.locator("select").select_option("2")  # the last units
    await shop_card.get_by_role("button", name="Reserve").click()

    hold = page.locator(".hold", has_text="Last-units lamp")
    await expect(hold).to_be_focused()
    await expect(hold.locator(".countdown")).to_have_text(re.compile(f"^{COUNTDOWN}$"))
    buy = hold.get_by_role("button", name="Complete purchase")
    for element in (hold, hold.locator(".countdown"), buy):
        assert await in_viewport(element), f"{element} is out of view"
    await expect(page).to_have_title(re.compile(f"^{COUNTDOWN} left to buy · Flash sale$"))
    # The card in view says whose the units are, not just "Sold out".
    await expect(shop_card.locator(".yours")).to_have_text("You hold 2 of these (see Your holds).")
    await assert_accessible(page)
    await screenshot(page, f"shop-hold-{size_name(size)}")

    # Scrolled anywhere, the hold stays in view.
    for where in ("0", "document.body.scrollHeight / 2", "document.body.scrollHeight"):
        await page.evaluate(f"window.scrollTo(0, {where})")
        assert await in_viewport(buy)
        assert await in_viewport(hold.locator(".countdown"))

    await buy.click()
    await expect(hold.locator(".outcome")).to_have_text("Purchased. Thank you!")
    await expect(page).to_have_title("Flash sale")
    await expect(shop_card.locator(".yours")).to_be_hidden()
    await assert_accessible(page)


@EACH_SIZE
async def test_the_hold_bar_can_be_folded_away_and_still_shows_the_time_left(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    first = await new_product(site, "Folding fan", 5)
    second = await new_product(site, "Folding chair", 5)
    page = await open_shop(browser, site, size)
    for product in (first, second):
        await card(page, product).get_by_role("button", name="Reserve").click()
        await expect(page.locator(".hold", has_text=product["name"])).to_be_focused()
    summary = page.locator("#holds-summary")
    await expect(summary).to_have_text(re.compile(f"^2 holds · next ends in {COUNTDOWN}$"))
    toggle = page.get_by_role("button", name="Hide")
    await toggle.click()
    await expect(page.locator("#holds")).to_be_hidden()
    await expect(page.get_by_role("button", name="Show")).to_have_attribute(
        "aria-expanded", "false"
    )
    assert await in_viewport(summary)
    await assert_accessible(page)
    # A new hold opens the bar again, with the focus on it.
    await card(page, first).get_by_role("button", name="Reserve").click()
    await expect(page.locator("#holds")).to_be_visible()
    await expect(page.locator(".hold").first).to_be_focused()
    await expect(summary).to_have_text(re.compile(f"^3 holds · next ends in {COUNTDOWN}$"))


# -- 2. all reserved is not sold out ---------------------------------------------------------


@EACH_SIZE
async def test_units_only_held_are_all_reserved_and_may_come_back_until_none_is_held(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    product = await new_product(site, f"Held-back hat ({size_name(size)})", 2)
    page = await open_shop(browser, site, size)
    count = card(page, product).locator(".count")
    first = await reserve(site, product["id"], 1)  # other shoppers
    second = await reserve(site, product["id"], 1)
    await expect(count).to_have_text("All reserved — 2 may come back")
    await expect(card(page, product)).to_have_class(re.compile(r"\ball-reserved\b"))
    await expect(card(page, product).get_by_role("button", name="Reserve")).to_be_disabled()
    await expect(card(page, product).locator("select")).to_be_disabled()
    await expect(card(page, product).locator(".waitlist")).to_be_hidden()  # none for it
    await assert_accessible(page)

    await act(site, first, "complete")
    await expect(count).to_have_text("All reserved — 1 may come back")
    await act(site, second, "cancel")  # it came back
    await expect(count).to_have_text("1 of 2 left")
    await expect(card(page, product).get_by_role("button", name="Reserve")).to_be_enabled()
    await act(site, await reserve(site, product["id"], 1), "complete")
    await expect(count).to_have_text("Sold out")  # nothing held: nothing may come back
    await expect(card(page, product)).not_to_have_class(re.compile(r"\ball-reserved\b"))


# -- 3. coming soon --------------------------------------------------------------------------


@EACH_SIZE
async def test_sales_not_started_are_coming_soon_with_the_date_in_the_shoppers_zone(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    later = await new_product(site, "New-year notebook", 5, saleStartsAt="2099-01-01T00:00:00Z")
    tokyo = await open_shop(browser, site, size, locale="en-GB", timezone_id="Asia/Tokyo")
    soon = tokyo.locator("#soon")
    await expect(tokyo.get_by_role("heading", name="Coming soon")).to_be_visible()
    await expect(soon.locator(card(tokyo, later))).to_have_count(1)
    await expect(tokyo.locator("#products").locator(card(tokyo, later))).to_have_count(0)
    # Midnight UTC is nine in the morning in Tokyo, and still the last evening of 2098 in
    # New York: the shopper's own zone, named.
    starts = card(tokyo, later).locator(".starts-at")
    await expect(starts).to_have_text("Starts Thu, 1 Jan 2099, 09:00 GMT+9")
    await expect(starts).to_have_attribute("datetime", "2099-01-01T00:00:00.000Z")
    await expect(card(tokyo, later).locator(".starts-in")).to_have_text(
        re.compile(r"^\(in [\d,]+ days\)$")
    )
    await expect(card(tokyo, later).get_by_role("button", name="Reserve")).to_be_disabled()
    await expect(card(tokyo, later).locator("select")).to_be_disabled()
    await assert_accessible(tokyo)

    new_york = await open_shop(browser, site, size, locale="en-US", timezone_id="America/New_York")
    await expect(card(new_york, later).locator(".starts-at")).to_have_text(
        "Starts Wed, Dec 31, 2098, 07:00 PM EST"
    )


@EACH_SIZE
async def test_a_sale_that_starts_moves_to_on_sale_now_and_can_be_reserved(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    starts = datetime.now(UTC) + timedelta(seconds=4)
    product = await new_product(site, "Punctual pen", 5, saleStartsAt=starts.isoformat())
    page = await open_shop(browser, site, size)
    await expect(page.locator("#soon").locator(card(page, product))).to_have_count(1)
    await expect(card(page, product).locator(".starts-in")).to_have_text(
        re.compile(r"^\(in 00:0\d\)$")
    )
    await expect(page.locator("#products").locator(card(page, product))).to_have_count(
        1, timeout=10_000
    )
    await expect(card(page, product).locator(".starts")).to_be_hidden()
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(page.locator(".hold", has_text="Punctual pen")).to_be_focused()


# -- 4. the shop cannot be reached -----------------------------------------------------------


@pytest.fixture(scope="module")
def outage_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose web process the tests stop and start again (in pounds, too)."""
    yield from serve(tmp_path_factory.mktemp("outage"), CURRENCY="GBP")


@EACH_SIZE
async def test_when_the_shop_cannot_be_reached_the_page_says_so_and_marks_the_stock_stale(
    browser: Browser, outage_site: Service, size: ViewportSize
) -> None:
    site = outage_site
    product = await new_product(site, "Offline ottoman", 5)
    page = await open_shop(browser, site, size)
    connection = page.locator("#connection")
    stale = card(page, product).locator(".stale-note")
    await expect(stale).to_be_hidden()

    await asyncio.to_thread(site.web.stop)
    try:
        await expect(connection).to_have_attribute("data-state", "offline", timeout=15_000)
        await expect(connection.locator(".label")).to_have_text("Can't reach the shop")
        await expect(connection.locator(".detail")).to_have_text(
            re.compile(r"^Stock as of [\d:]+(\s[AP]M)?$")
        )
        await expect(stale).to_be_visible()
        await expect(card(page, product).locator(".stock")).to_have_text(
            "5 of 5 left (may be out of date)"
        )
        await assert_accessible(page)
        await screenshot(page, f"shop-offline-{size_name(size)}")
    finally:
        await asyncio.to_thread(site.web.start)
        await asyncio.to_thread(site.wait_ready)
    await expect(connection).to_have_attribute("data-state", "live", timeout=30_000)
    await expect(stale).to_be_hidden()


async def test_healthy_polling_is_not_mistaken_for_an_outage(
    browser: Browser, site: Service
) -> None:
    page = await new_page(browser, PHONE)
    await page.route_web_socket(re.compile("^ws"), SocketSwitch().handle)
    await page.goto(site.base_url + "/")
    connection = page.locator("#connection")
    await expect(connection).to_have_attribute("data-state", "polling", timeout=10_000)
    await expect(connection).to_have_text("Updating every few seconds")
    await expect(page.locator(".stale-note:visible")).to_have_count(0)


# -- 5 and 6. the quantity list, and a refusal's stock ----------------------------------------


async def options(page: Page, product: dict[str, Any]) -> list[str]:
    values: list[str] = (
        await card(page, product)
        .locator("select option")
        .evaluate_all("(options) => options.map((o) => o.value)")
    )
    return values


@EACH_SIZE
async def test_the_quantity_list_offers_only_what_is_left(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    plenty = await new_product(site, "Plenty plates", 50)
    few = await new_product(site, "Few forks", 3)
    page = await open_shop(browser, site, size)
    assert await options(page, plenty) == [str(q) for q in range(1, 11)]  # MAX_QUANTITY
    assert await options(page, few) == ["1", "2", "3"]
    await reserve(site, few["id"], 2)
    await expect(card(page, few).locator(".count")).to_have_text("1 of 3 left")
    assert await options(page, few) == ["1"]
    await reserve(site, few["id"], 1)
    await expect(card(page, few).locator(".count")).to_have_text("All reserved — 3 may come back")
    await expect(card(page, few).locator("select")).to_be_disabled()
    await expect(card(page, few).get_by_role("button", name="Reserve")).to_be_disabled()
    await assert_accessible(page)


@EACH_SIZE
async def test_a_refusal_shows_the_current_stock_at_once(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    """Polling, and hearing nothing new from the polls: only the refusal can tell."""
    product = await new_product(site, "Refused rug", 3)
    page = await new_page(browser, size)
    await page.route_web_socket(re.compile("^ws"), SocketSwitch().handle)
    listings = 0

    async def first_listing_only(route: Route) -> None:
        nonlocal listings
        listings += 1
        if listings == 1:
            await route.continue_()
        else:
            await route.fulfill(status=304, headers={"ETag": '"unchanged"'})

    await page.route("**/api/products", first_listing_only)
    await page.goto(site.base_url + "/")
    await expect(card(page, product).locator(".count")).to_have_text("3 of 3 left")
    await reserve(site, product["id"], 2)
    await card(page, product).locator("select").select_option("3")
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(card(page, product).locator(".error")).to_have_text("Only 1 left, 3 requested.")
    await expect(card(page, product).locator(".count")).to_have_text("1 of 3 left")
    assert await options(page, product) == ["1"]
    await assert_accessible(page)


# -- 7. completing: progress, price and total ------------------------------------------------


@EACH_SIZE
async def test_a_hold_shows_its_price_and_total_and_completing_shows_progress(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    product = await new_product(site, "Priced parasol", 5, price=19.99)
    page = await open_shop(browser, site, size, locale="en-GB")
    await card(page, product).locator("select").select_option("3")
    await card(page, product).get_by_role("button", name="Reserve").click()
    hold = page.locator(".hold", has_text="Priced parasol")
    await expect(hold.locator(".cost")).to_have_text("€19.99 each · Total €59.97")

    release = asyncio.Event()

    async def slow_complete(route: Route) -> None:
        await release.wait()
        await route.continue_()

    await page.route("**/complete", slow_complete)
    await hold.get_by_role("button", name="Complete purchase").click()
    busy = hold.get_by_role("button", name="Processing…")
    await expect(busy).to_be_disabled()
    await expect(hold.get_by_role("button", name="Cancel")).to_be_disabled()
    await expect(hold).to_have_attribute("aria-busy", "true")
    await assert_accessible(page)
    release.set()
    await expect(hold.locator(".outcome")).to_have_text("Purchased. Thank you!")
    await expect(hold).to_have_attribute("aria-busy", "false")
    await expect(hold.locator(".reference")).to_be_hidden()  # no order reference yet


@EACH_SIZE
async def test_a_purchase_the_shop_completes_shows_its_order_reference(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    """The shop's backend completes the hold once it has the payment, with its own order
    reference: the shopper's page shows it and says it, from the live update alone."""
    name = f"Referenced rug ({size_name(size)})"
    product = await new_product(site, name, 5, price=40)
    page = await open_shop(browser, site, size, locale="en-GB")
    await card(page, product).locator("select").select_option("2")
    await card(page, product).get_by_role("button", name="Reserve").click()
    hold = page.locator(".hold", has_text=name)
    await expect(hold).to_be_focused()
    await expect(hold.locator(".cost")).to_have_text("€40.00 each · Total €80.00")
    reservation_id = await hold.get_attribute("data-id")

    async with site.client() as client:
        made = await client.post(
            "/api/admin/shop-keys", json={"name": "checkout"}, headers=site.admin_headers()
        )
        assert made.status_code == 201, made.text
        done = await client.post(
            f"/api/reservations/{reservation_id}/complete",
            json={"orderReference": "ORD-2041"},
            headers={"Authorization": f"Bearer {made.json()['key']}"},
        )
        assert done.status_code == 200, done.text

    await expect(hold.locator(".outcome")).to_have_text("Purchased. Thank you!")
    await expect(hold.locator(".reference")).to_have_text("Order reference: ORD-2041")
    await expect(page.locator("#announcer")).to_have_text(
        f"You bought 2 of {name}. Order reference: ORD-2041."
    )
    await expect(hold.get_by_role("button", name="Complete purchase")).to_be_hidden()
    await assert_accessible(page)
    await screenshot(page, f"shop-bought-{size_name(size)}", docs=size == PHONE)


# -- 8. announcements ------------------------------------------------------------------------

RECORD_ANNOUNCEMENTS = """
window.__said = [];
document.addEventListener("DOMContentLoaded", () => {
  const announcer = document.getElementById("announcer");
  new MutationObserver(() => window.__said.push(announcer.textContent))
    .observe(announcer, { childList: true, characterData: true, subtree: true });
});
"""


@pytest.fixture(scope="module")
def short_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Holds of 12 seconds: the 60- and 30-second reminders are behind from the start."""
    yield from serve(tmp_path_factory.mktemp("short"), HOLD_SECONDS="12")


async def test_a_short_hold_hears_only_the_reminders_still_ahead_and_its_end_once(
    browser: Browser, short_site: Service
) -> None:
    async def shop_at(size: ViewportSize) -> list[str]:
        product = await new_product(short_site, f"Brief {size_name(size)} bell", 3)
        page = await new_page(browser, size)
        await page.add_init_script(RECORD_ANNOUNCEMENTS)
        await page.goto(short_site.base_url + "/")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await card(page, product).get_by_role("button", name="Reserve").click()
        hold = page.locator(".hold", has_text=product["name"])
        await expect(hold).to_have_attribute("data-status", "EXPIRED", timeout=30_000)
        await expect(card(page, product).locator(".count")).to_have_text("3 of 3 left")
        said: list[str] = await page.evaluate("window.__said")
        name = product["name"]
        assert len(said) == 3, said
        assert re.fullmatch(rf"Held 1 of {name} for 00:1[12]\.", said[0]), said
        assert said[1:] == [
            f"10 seconds left to buy {name}.",
            f"Your hold of {name} expired; the units went back on sale.",
        ]
        await assert_accessible(page)
        return said

    # Both sizes at once: the holds take their 12 seconds side by side.
    await asyncio.gather(*(shop_at(size) for size in SIZES.values()))


# -- 9. the currency, and the header ---------------------------------------------------------


@EACH_SIZE
async def test_prices_are_in_the_shops_currency_in_the_shoppers_locale(
    browser: Browser, site: Service, outage_site: Service, size: ViewportSize
) -> None:
    euros = await new_product(site, "Euro easel", 5, price=1234.5)
    german = await open_shop(browser, site, size, locale="de-DE")
    await expect(card(german, euros).locator(".price")).to_have_text("1.234,50\u00a0€")
    american = await open_shop(browser, site, size, locale="en-US")
    await expect(card(american, euros).locator(".price")).to_have_text("€1,234.50")

    pounds = await new_product(outage_site, "Pound press", 5, price=1234.5)
    british = await open_shop(browser, outage_site, size, locale="en-GB")
    await expect(card(british, pounds).locator(".price")).to_have_text("£1,234.50")


@EACH_SIZE
async def test_the_header_with_the_connection_state_stays_in_view(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    await fillers(site, 12)  # a page taller than the window at either size
    page = await open_shop(browser, site, size)
    await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    assert await page.evaluate("window.scrollY") > 0
    assert await in_viewport(page.locator("#connection"))
    await expect(page.locator("#connection")).to_have_text("Live")
    await assert_accessible(page)


# -- the page as a whole -----------------------------------------------------------------------


@EACH_SIZE
async def test_the_shop_fits_and_passes_axe_while_loading_and_once_loaded(
    browser: Browser, site: Service, size: ViewportSize, tmp_path: Path
) -> None:
    page = await new_page(browser, size)
    stalled = asyncio.Event()

    async def stall(route: Route) -> None:
        await stalled.wait()
        await route.continue_()

    await page.route("**/api/config", stall)
    await page.goto(site.base_url + "/")
    await expect(page.locator("#loading")).to_be_visible()
    await assert_accessible(page)
    stalled.set()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(page.locator("#loading")).to_be_hidden()
    assert await page.evaluate("document.documentElement.scrollWidth") <= size["width"]
    await assert_accessible(page)


# -- many products -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(tmp_path_factory.mktemp("big-shop"))


@EACH_SIZE
async def test_a_shop_of_many_products_shows_the_newest_page_and_follows_only_it(
    browser: Browser, big_shop: Service, size: ViewportSize
) -> None:
    """After a month of sales a shop has thousands of products (1.35 MB at 10,000): the
    page shows the newest hundred, follows those alone, and has the older ones a link away;
    a sale's page (`/?ids=…`) shows the products its address names."""
    products = [await new_product(big_shop, f"Item {n}", 5) for n in range(105)]
    page = await new_page(browser, size)
    await page.goto(big_shop.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(card(page, products[-1])).to_be_visible()
    await expect(page.locator(".product")).to_have_count(100)
    await expect(card(page, products[4])).to_have_count(0)
    await reserve(big_shop, products[-1]["id"], 2)
    await expect(card(page, products[-1]).locator(".count")).to_have_text("3 of 5 left")
    await assert_accessible(page)

    await page.get_by_role("link", name="Older products").click()
    await expect(card(page, products[4])).to_be_visible()
    await expect(card(page, products[-1])).to_have_count(0)

    sale = [products[3], products[50]]
    await page.goto(big_shop.base_url + f"/?ids={sale[0]['id']},{sale[1]['id']}")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(page.locator(".product")).to_have_count(2)
    await expect(page.get_by_role("link", name="Older products")).to_be_hidden()
    await reserve(big_shop, sale[0]["id"], 1)
    await expect(card(page, sale[0]).locator(".count")).to_have_text("4 of 5 left")
    await page.context.close()


async def test_a_product_taken_back_from_the_database_shows_on_an_open_page(
    browser: Browser, site: Service
) -> None:
    """After a database restore (or a faulty peer's stock message far ahead, here), the
    product's versions are far below those the page holds: it dropped every frame and
    poll of the product as older, and showed the old stock until it was reloaded. It takes
    the `product` frame marked `reset` that the web process sends at its next reload (5 s),
    and the product's changes after it."""
    product = await new_product(site, "Restored radio", 10)
    page = await open_shop(browser, site, SIZES["desktop"])
    stock = card(page, product).locator(".stock .count")
    await expect(stock).to_have_text("10 of 10 left")
    far = {"type": "stock", "productId": product["id"], "availableStock": 0, "version": 2**62}
    async with Redis.from_url(site.web.env["REDIS_URL"]) as redis:
        await redis.publish(events_channel(0), to_json(far))
    await expect(stock).to_have_text("Sold out")
    await expect(stock).to_have_text("10 of 10 left", timeout=15_000)
    await reserve(site, product["id"])
    await expect(stock).to_have_text("9 of 10 left")
