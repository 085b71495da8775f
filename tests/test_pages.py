"""The shop page and the operator console in a real browser (Debian's Chromium, driven by
Playwright), against real uvicorn, worker and Redis processes: the basics that every size
shares. What a real sale needs of each page, at both sizes and checked with axe-core, is in
tests/test_shop_page.py and tests/test_console.py; the set-up is in tests/browser.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, expect

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import ADMIN_TOKEN, Service
from tests.browser import (
    ARTIFACTS,
    SocketSwitch,
    card,
    migrated_sqlite,
    new_product,
    reserve,
    serve,
)
from tests.browser import open_shop as open_sized_shop

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The whole service, for the pages of this module."""
    yield from serve(tmp_path_factory.mktemp("site"))


async def open_shop(browser: Browser, site: Service, **context: Any) -> Page:
    size = context.pop("viewport", {"width": 1280, "height": 720})
    return await open_sized_shop(browser, site, size, **context)


def seconds(countdown: str) -> int:
    minutes, secs = countdown.split(":")
    return int(minutes) * 60 + int(secs)


async def test_reserve_counts_down_and_complete_says_purchased(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Countdown kettle", 5)
    page = await open_shop(browser, site)
    await card(page, product).get_by_role("button", name="Reserve").click()
    countdown = page.locator(".hold .countdown")
    await expect(countdown).to_have_text(re.compile(r"^0[12]:\d\d$"))
    first = seconds(await countdown.inner_text())
    assert 110 <= first <= 120
    await expect(countdown).not_to_have_text(await countdown.inner_text(), timeout=3000)
    assert seconds(await countdown.inner_text()) < first
    await expect(card(page, product).locator(".count")).to_have_text("4 of 5 left")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "shop.png", full_page=True)

    await page.get_by_role("button", name="Complete purchase").click()
    await expect(page.locator(".hold .outcome")).to_have_text("Purchased. Thank you!")
    await expect(card(page, product).locator(".count")).to_have_text("4 of 5 left")


async def test_cancel_puts_the_units_back(browser: Browser, site: Service) -> None:
    product = await new_product(site, "Cancel candle", 5)
    page = await open_shop(browser, site)
    await card(page, product).locator("select").select_option("2")
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(card(page, product).locator(".count")).to_have_text("3 of 5 left")
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.locator(".hold .outcome")).to_contain_text("Cancelled")
    await expect(card(page, product).locator(".count")).to_have_text("5 of 5 left")


async def test_a_reservation_in_one_page_moves_the_stock_in_another_without_polling(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Shared scarf", 10)
    buyer = await open_shop(browser, site)
    watcher = await open_shop(browser, site)
    polls: list[str] = []
    watcher.on(
        "request",
        lambda request: polls.append(request.url) if "/api/products" in request.url else None,
    )
    started = time.monotonic()
    await card(buyer, product).get_by_role("button", name="Reserve").click()
    await expect(card(watcher, product).locator(".count")).to_have_text(
        "9 of 10 left", timeout=1000
    )
    assert time.monotonic() - started < 1.5
    assert polls == []  # it came over the socket


async def test_without_the_socket_the_page_polls_and_stays_correct(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Polled poncho", 10)
    page = await (await browser.new_context()).new_page()
    switch = SocketSwitch()
    await page.route_web_socket(re.compile("^ws"), switch.handle)
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/api/products" in r.url else None)
    await page.goto(site.base_url + "/")
    connection = page.locator("#connection")
    await expect(connection).to_have_attribute("data-state", "polling", timeout=10_000)
    await expect(connection).to_have_text("Updating every few seconds")

    await reserve(site, product["id"], 3)
    await expect(card(page, product).locator(".count")).to_have_text("7 of 10 left", timeout=8000)
    assert len(polls) >= 2  # the first load, then polling

    switch.on = True  # the socket can be used again: the page goes back to it
    await expect(connection).to_have_attribute("data-state", "live", timeout=20_000)
    await expect(connection).to_have_text("Live")


async def test_a_page_that_the_server_closes_on_polls_too(browser: Browser, site: Service) -> None:
    product = await new_product(site, "Closed cloak", 4)
    page = await (await browser.new_context()).new_page()

    async def close_from_server(socket: WebSocketRoute) -> None:
        # As a full server does: accept, then close before sending anything.
        server = socket.connect_to_server()
        server.on_message(lambda message: None)
        await socket.close(code=1013, reason="try again later")

    await page.route_web_socket(re.compile("^ws"), close_from_server)
    await page.goto(site.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "polling", timeout=10_000
    )
    await reserve(site, product["id"], 1)
    await expect(card(page, product).locator(".count")).to_have_text("3 of 4 left", timeout=8000)


async def test_a_short_hold_expires_and_the_page_says_so(
    browser: Browser, tmp_path: Path, own_redis: EmbeddedRedis
) -> None:
    service = Service(
        migrated_sqlite(tmp_path / "short.db"),
        own_redis.url,
        tmp_path / "logs",
        web_concurrency=1,
        HOLD_SECONDS="3",
    )
    service.start()
    try:
        product = await new_product(service, "Fleeting fedora", 2)
        page = await open_shop(browser, service)
        await card(page, product).get_by_role("button", name="Reserve").click()
        await expect(card(page, product).locator(".count")).to_have_text("1 of 2 left")
        await expect(page.locator(".hold .outcome")).to_have_text(
            "This hold expired: its units went back on sale.", timeout=10_000
        )
        await expect(card(page, product).locator(".count")).to_have_text(
            "2 of 2 left", timeout=10_000
        )
        await expect(page.locator(".hold")).to_have_attribute("data-status", "EXPIRED")
    finally:
        service.stop()


async def test_a_wrong_local_clock_still_shows_the_right_time_left(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Clockwork cup", 3)
    page = await (await browser.new_context()).new_page()
    await page.clock.install(time=time.time() - 5 * 60)  # this device is five minutes slow
    await page.goto(site.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await card(page, product).get_by_role("button", name="Reserve").click()
    countdown = page.locator(".hold .countdown")
    await expect(countdown).to_have_text(re.compile(r"^0[12]:\d\d$"))
    assert 110 <= seconds(await countdown.inner_text()) <= 120


async def test_refusals_are_sentences(browser: Browser, site: Service) -> None:
    few = await new_product(site, "Scarce scone", 3)
    sold = await new_product(site, "Gone gloves", 1)
    later = await new_product(site, "Later loafers", 5, saleStartsAt="2099-01-01T00:00:00Z")
    async with site.client() as client:
        bought = await reserve(site, sold["id"], 1)
        await client.post(f"/api/reservations/{bought['id']}/complete")
    page = await open_shop(browser, site)
    # The list offers only what is left; a page that has not heard of the last holds yet
    # still asks for more (test_a_refusal_shows_the_current_stock_at_once).
    await expect(card(page, few).locator("select option")).to_have_count(3)

    await expect(card(page, sold).locator(".count")).to_have_text("Sold out")
    await expect(card(page, sold).get_by_role("button", name="Reserve")).to_be_disabled()

    await expect(card(page, later).locator(".starts")).to_contain_text("Starts ")
    await expect(card(page, later).get_by_role("button", name="Reserve")).to_be_disabled()


@pytest.fixture(scope="module")
def limited_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service that lets each client make one reservation per 5 seconds."""
    yield from serve(
        tmp_path_factory.mktemp("limited"),
        worker=False,
        RESERVE_RATE_LIMIT="1/5",
        RESERVE_RATE_LIMIT_WAIT_MS="5000",
    )


async def test_too_many_reservations_is_a_sentence_and_the_page_waits(
    browser: Browser, limited_site: Service
) -> None:
    product = await new_product(limited_site, "Rationed rice", 50)
    page = await open_shop(browser, limited_site)
    button = card(page, product).get_by_role("button", name="Reserve")
    error = card(page, product).locator(".error")
    # One per window is allowed: the second click in the same window is refused (or the
    # third, if the first two straddled a window's end).
    for _ in range(3):
        held = await page.locator(".hold").count()
        await button.click()
        refused = card(page, product).locator(".error:not([hidden])")
        await expect(page.locator(".hold").nth(held).or_(refused)).to_be_visible()
        if await error.is_visible():
            break
    await expect(error).to_have_text(
        re.compile(r"^Too many requests from you just now; please wait [1-5] seconds")
    )
    # The page holds back until the server's Retry-After has passed, then lets you try.
    await expect(button).to_be_disabled()
    await expect(button).to_be_enabled(timeout=8000)


async def test_a_busy_server_is_a_sentence_and_the_page_waits(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Busy biscuits", 50)
    page = await open_shop(browser, site)
    # The service's own overload answer (server/api/middleware.py), as a proxy would pass it on:
    # making one process overloaded on cue is the drills' business (tests/test_drills.py).
    busy = error_body(503, "overloaded", "The shop is very busy right now.")
    await page.route(
        "**/api/reservations",
        lambda route: route.fulfill(
            status=503, json=busy, headers={"Retry-After": "2", "X-Request-ID": "test"}
        ),
    )
    button = card(page, product).get_by_role("button", name="Reserve")
    await button.click()
    await expect(card(page, product).locator(".error")).to_have_text(
        "The shop is very busy right now; please try again in a moment."
    )
    await expect(button).to_be_disabled()
    await page.unroute("**/api/reservations")
    await expect(button).to_be_enabled(timeout=5000)
    await button.click()
    await expect(page.locator(".hold .countdown")).to_be_visible()


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "error": "Service Unavailable", "code": code, "message": message}


async def test_a_page_that_has_not_heard_yet_shows_the_servers_sentence(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Last lantern", 1)
    page = await (await browser.new_context()).new_page()
    switch = SocketSwitch()  # off: this page hears nothing live
    await page.route_web_socket(re.compile("^ws"), switch.handle)
    await page.goto(site.base_url + "/")
    await expect(card(page, product).locator(".count")).to_have_text("1 of 1 left")
    await reserve(site, product["id"], 1)
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(card(page, product).locator(".error")).to_have_text(
        "All reserved: 1 unit is held and may come back."
    )
    # ...and the stock the refusal carried is shown at once, polls or not.
    await expect(card(page, product).locator(".count")).to_have_text(
        "All reserved — 1 may come back"
    )


async def test_holds_survive_a_reload(browser: Browser, site: Service) -> None:
    product = await new_product(site, "Remembered robe", 5)
    page = await open_shop(browser, site)
    await card(page, product).get_by_role("button", name="Reserve").click()
    await expect(page.locator(".hold .countdown")).to_be_visible()
    await page.reload()
    await expect(page.locator(".hold .what")).to_have_text("1 × Remembered robe")
    await expect(page.locator(".hold .countdown")).to_have_text(re.compile(r"^0[12]:\d\d$"))


async def test_the_shop_works_from_the_keyboard(browser: Browser, site: Service) -> None:
    product = await new_product(site, "Keyboard kite", 5)
    page = await open_shop(browser, site)
    select = card(page, product).locator("select")
    await select.focus()
    await page.keyboard.press("Tab")  # to its Reserve button
    await expect(card(page, product).get_by_role("button", name="Reserve")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator(".hold .countdown")).to_be_visible()
    await page.get_by_role("button", name="Complete purchase").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator(".hold .outcome")).to_have_text("Purchased. Thank you!")


async def test_the_page_fits_a_phone(browser: Browser, site: Service) -> None:
    page = await open_shop(browser, site, viewport={"width": 375, "height": 740})
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375


async def test_data_reaches_the_page_as_text_never_as_html(browser: Browser, site: Service) -> None:
    product = await new_product(site, '<img src=x onerror="window.pwned=1">Hack hat', 2)
    page = await open_shop(browser, site)
    await expect(card(page, product).locator(".name")).to_have_text(
        '<img src=x onerror="window.pwned=1">Hack hat'
    )
    assert await page.evaluate("window.pwned") is None


# -- the operator console ------------------------------------------------------------------


async def test_the_console_refuses_a_wrong_token_and_works_with_the_right_one(
    browser: Browser, site: Service
) -> None:
    page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
    await page.goto(site.base_url + "/admin")
    await page.get_by_label("Operator token").fill("not-it")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#signin-message")).to_have_text(
        "That token is not the operator token."
    )

    await page.get_by_label("Operator token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#console")).to_be_visible()

    await page.get_by_label("Name", exact=True).fill("Console cape")
    await page.locator("#create-form").get_by_label("Price").fill("19.99")
    await page.get_by_label("Stock", exact=True).and_(page.get_by_role("spinbutton")).fill("8")
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator("#create-message")).to_contain_text("Created Console cape")
    row = page.locator("#stock-rows tr", has_text="Console cape")
    await expect(row.locator(".available")).to_have_text("8")

    # A new product is the one chosen: its details and actions are shown.
    await expect(page.locator("#detail-name")).to_have_text("Console cape")
    await page.get_by_label("Units to add to Console cape").fill("4")
    await page.get_by_role("button", name="Restock").click()
    await expect(row.locator(".total")).to_have_text("12")
    await expect(row.locator(".available")).to_have_text("12")

    product_id = int(await row.get_attribute("data-id") or 0)
    await reserve(site, product_id, 3)
    await expect(row.locator(".held")).to_have_text("3", timeout=5000)
    await expect(row.locator(".available")).to_have_text("9")
    await expect(page.locator("#hold-rows tr", has_text="Console cape")).to_have_count(1)
    await row.get_by_role("button", name="Console cape").click()
    await expect(page.locator("#detail-name")).to_have_text("Console cape")
    # available, held and sold, drawn from the server's history
    await expect(page.locator("#chart polyline")).to_have_count(3, timeout=5000)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "admin.png", full_page=True)
