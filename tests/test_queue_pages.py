"""The waiting room on the pages (issue 17), in Chromium: the shop page's lobby from joining
the line to the shopper's turn (its countdown) to their hold, the sold-out ending, a turn
that passed; the console's waiting rooms and their settings. Other shoppers are API clients,
each with their own cookie. Every state is checked with axe-core.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    ViewportSize,
    expect,
)

from server.devtools.processes import Service
from tests.browser import (
    DESKTOP,
    EACH_SIZE,
    PHONE,
    SocketSwitch,
    assert_accessible,
    card,
    new_page,
    new_product,
    open_console,
    open_shop,
    screenshot,
    serve,
    size_name,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

PASS_SECONDS = 20  # long enough to act in, short enough to watch one lapse


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(tmp_path_factory.mktemp("queue"), PASS_SECONDS=str(PASS_SECONDS))


@asynccontextmanager
async def shopper(site: Service) -> AsyncIterator[httpx.AsyncClient]:
    """Another shopper: an API client with a cookie of its own (given by GET /api/me)."""
    async with site.client() as client:
        response = await client.get("/api/me")
        assert response.status_code == 200, response.text
        yield client


async def join(client: httpx.AsyncClient, product: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/api/products/{product['id']}/queue")
    assert response.status_code in (200, 201), response.text
    ticket: dict[str, Any] = response.json()
    return ticket


async def reserve(client: httpx.AsyncClient, product: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(
        "/api/reservations", json={"productId": product["id"], "quantity": 1}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_for_state(
    client: httpx.AsyncClient, product: dict[str, Any], state: str, within: float = 15.0
) -> dict[str, Any]:
    """Polls the shopper's ticket (as a page without a socket would) until it is `state`."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + within
    while True:
        response = await client.get(f"/api/products/{product['id']}/queue")
        ticket: dict[str, Any] = response.json()
        if ticket.get("state") == state:
            return ticket
        assert asyncio.get_running_loop().time() < deadline, f"still {ticket}"
        await asyncio.sleep(0.1)


def soon(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def start_now(site: Service, product: dict[str, Any]) -> None:
    """The operator moves the sale's start to now: the room starts admitting (a start set a
    few seconds ahead would race with a slow machine)."""
    async with site.client() as client:
        response = await client.patch(
            f"/api/admin/products/{product['id']}",
            json={"saleStartsAt": soon(0)},
            headers=site.admin_headers(),
        )
    assert response.status_code == 200, response.text


async def second_after(
    first: httpx.AsyncClient, lobby: Locator, site: Service, product: dict[str, Any]
) -> None:
    """`first` joins the line, then the page (number 2); the sale starts and `first` is
    admitted."""
    await join(first, product)
    await lobby.get_by_role("button", name="Join the line").click()
    await expect(lobby.locator(".lobby-place")).to_have_text("Number 2 in line · 1 ahead of you")
    await start_now(site, product)
    await wait_for_state(first, product, "admitted")


def posted_joins(page: Page) -> list[str]:
    """The joins the page POSTs from now on (their URLs; a join over the socket is none)."""
    posted: list[str] = []

    def seen(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/queue"):
            posted.append(request.url)

    page.on("request", seen)
    return posted


async def lobby_text(page: Page, product: dict[str, Any]) -> str:
    return await card(page, product).locator(".lobby").inner_text()


# -- the shop page -------------------------------------------------------------------------


@EACH_SIZE
async def test_the_lobby_from_waiting_to_the_shoppers_turn_to_their_hold(
    browser: Browser, site: Service, size: ViewportSize
) -> None:
    name = f"Drop sneaker ({size_name(size)})"
    product = await new_product(site, name, 1, queue="fifo", saleStartsAt=soon(600))
    page = await open_shop(browser, site, size, locale="en-GB")
    shop_card = card(page, product)
    lobby = shop_card.locator(".lobby")
    await expect(lobby).to_be_visible()
    # Before the start, the card offers the line, not a Reserve button.
    await expect(shop_card.locator(".reserve")).to_be_hidden()
    join_button = lobby.get_by_role("button", name="Join the line")
    await expect(join_button).to_be_enabled()
    await assert_accessible(page)

    # The page joins over its socket, which is live: no request of its own.
    joins_posted = posted_joins(page)
    async with shopper(site) as first:
        await join(first, product)  # another shopper is in line before this one
        await join_button.click()
        await expect(lobby.locator(".lobby-state")).to_be_focused()
        assert joins_posted == []
        await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
        await expect(lobby.locator(".lobby-place")).to_have_text(
            "Number 2 in line · 1 ahead of you"
        )
        await expect(page.locator("#announcer")).to_have_text(
            f"You're in line for {name}: number 2, 1 ahead of you."
        )
        await expect(lobby.get_by_role("button", name="Leave the line")).to_be_visible()
        await expect(lobby.locator(".lobby-count")).to_have_text("2 people waiting")
        await assert_accessible(page)
        await screenshot(page, f"shop-queue-waiting-{size_name(size)}", docs=True)

        # The sale starts: the one unit goes to the first in line; this shopper waits, the
        # unit only held ("may come back").
        await start_now(site, product)
        await wait_for_state(first, product, "admitted")
        await expect(lobby.locator(".lobby-place")).to_have_text(
            "Number 1 in line · 0 ahead of you", timeout=10_000
        )
        await expect(shop_card.locator(".reserve")).to_be_hidden()
        hold = await reserve(first, product)
        await expect(shop_card.locator(".count")).to_have_text("All reserved — 1 may come back")
        await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
        await assert_accessible(page)

        # The first shopper lets it go: the unit comes back, and it is this shopper's turn.
        response = await first.post(f"/api/reservations/{hold['id']}/cancel")
        assert response.status_code == 200, response.text

    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "Your turn: reserve within", timeout=10_000
    )
    await expect(lobby.locator(".pass-countdown")).to_have_text(re.compile(r"^00:[012]\d$"))
    await expect(page.locator("#announcer")).to_have_text(
        re.compile(rf"^Your turn for {re.escape(name)}: reserve within 00:[012]\d\.$")
    )
    reserve_button = shop_card.get_by_role("button", name="Reserve")
    await expect(reserve_button).to_be_focused()  # the focus was in the lobby
    await expect(page).to_have_title(re.compile(r"^Your turn: 00:[012]\d to reserve · Flash sale$"))
    await page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
    await assert_accessible(page)
    await screenshot(page, f"shop-queue-turn-{size_name(size)}", docs=True)

    # Reserving is as ever: the hold goes into the bar, and the turn was used.
    await reserve_button.click()
    held = page.locator(".hold", has_text=name)
    await expect(held).to_be_focused()
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "You had your turn and reserved (see Your holds)."
    )
    await expect(shop_card.locator(".reserve")).to_be_hidden()
    await assert_accessible(page)


async def test_the_line_ends_sold_out_and_says_so(browser: Browser, site: Service) -> None:
    name = "Last-drop cap"
    product = await new_product(site, name, 1, queue="fifo", saleStartsAt=soon(600))
    page = await open_shop(browser, site, PHONE, locale="en-GB")
    lobby = card(page, product).locator(".lobby")
    async with shopper(site) as first:
        await second_after(first, lobby, site, product)
        hold = await reserve(first, product)
        response = await first.post(f"/api/reservations/{hold['id']}/complete")
        assert response.status_code == 200, response.text
    # Nothing left and nothing held: the room closes, every ticket ends sold out.
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "Sold out: every unit has gone. Thank you for waiting.", timeout=10_000
    )
    await expect(page.locator("#announcer")).to_have_text(f"{name} sold out while you waited.")
    await expect(lobby.get_by_role("button")).to_have_count(0)
    await expect(card(page, product).locator(".count")).to_have_text("Sold out")
    await assert_accessible(page)
    await screenshot(page, "shop-queue-sold-out-phone", docs=True)


async def test_the_lobby_says_why_no_wait_is_estimated_while_turns_cover_the_units(
    browser: Browser, site: Service
) -> None:
    """The one unit is the turn of the shopper ahead, who has not reserved yet: nobody more
    is admitted until that turn lapses, and the page says so (it said "the line has not
    moved", which had just moved)."""
    product = await new_product(
        site, "Single espresso cup", 1, queue="fifo", saleStartsAt=soon(600)
    )
    page = await open_shop(browser, site, DESKTOP, locale="en-GB")
    lobby = card(page, product).locator(".lobby")
    async with shopper(site) as first:
        await second_after(first, lobby, site, product)
        await expect(lobby.locator(".lobby-place")).to_have_text(
            "Number 1 in line · 0 ahead of you", timeout=10_000
        )
        await expect(lobby.locator(".lobby-wait")).to_have_text(
            "Estimated wait: not known: those ahead with a turn now cover every unit left; "
            "you move up as their turns lapse or units come back.",
            timeout=10_000,
        )


async def test_a_turn_not_taken_passes_and_the_shopper_may_join_again(
    browser: Browser, site: Service
) -> None:
    name = "Patient kettle"
    product = await new_product(site, name, 3, queue="fifo", saleStartsAt=soon(600))
    page = await open_shop(browser, site, DESKTOP, locale="en-GB")
    shop_card = card(page, product)
    lobby = shop_card.locator(".lobby")
    await lobby.get_by_role("button", name="Join the line").click()
    await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
    await start_now(site, product)
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "Your turn: reserve within", timeout=10_000
    )
    # The shopper looks away: the pass runs out.
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "Your turn passed; join again.", timeout=(PASS_SECONDS + 10) * 1000
    )
    await expect(page.locator("#announcer")).to_have_text(
        f"Your turn for {name} passed; join again to wait for another."
    )
    await expect(shop_card.locator(".reserve")).to_be_hidden()
    await assert_accessible(page)
    await lobby.get_by_role("button", name="Join again").click()
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        re.compile(r"^(You're in line\.|Your turn: reserve within)$")
    )


async def test_a_reload_keeps_the_shoppers_place_and_they_can_leave(
    browser: Browser, site: Service
) -> None:
    product = await new_product(site, "Reloaded lamp", 5, queue="random", saleStartsAt=soon(600))
    page = await open_shop(browser, site, DESKTOP, locale="en-GB")
    lobby = card(page, product).locator(".lobby")
    await expect(lobby.locator(".lobby-headline")).to_have_text(
        "Join the line now: at the start everyone in it is put in a random order."
    )
    await lobby.get_by_role("button", name="Join the line").click()
    # Random: no place until the draw at the start.
    await expect(lobby.locator(".lobby-place")).to_have_text(
        re.compile(r"^Your place is drawn at random when the sale starts \(.+\); everyone")
    )
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
    await lobby.get_by_role("button", name="Leave the line").click()
    await expect(lobby.get_by_role("button", name="Join the line")).to_be_visible()
    await expect(page.locator("#announcer")).to_have_text("You left the line for Reloaded lamp.")
    await assert_accessible(page)


async def test_a_page_without_its_socket_joins_with_a_post(browser: Browser, site: Service) -> None:
    """The socket closed (a proxy that refuses WebSockets): the page polls, and its join
    is a POST, with the same lobby; the socket back, the next join goes over it."""
    product = await new_product(site, "Polled kettle", 5, queue="fifo", saleStartsAt=soon(600))
    page = await new_page(browser, DESKTOP, locale="en-GB")
    switch = SocketSwitch()
    await page.route_web_socket(re.compile("^ws"), switch.handle)
    await page.goto(site.base_url + "/")
    connection = page.locator("#connection")
    await expect(connection).to_have_attribute("data-state", "polling", timeout=10_000)
    joins_posted = posted_joins(page)
    lobby = card(page, product).locator(".lobby")
    await lobby.get_by_role("button", name="Join the line").click()
    await expect(lobby.locator(".lobby-state")).to_be_focused()
    await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
    await expect(lobby.locator(".lobby-place")).to_have_text("Number 1 in line · 0 ahead of you")
    await expect(page.locator("#announcer")).to_have_text(
        "You're in line for Polled kettle: number 1, 0 ahead of you."
    )
    assert len(joins_posted) == 1
    await assert_accessible(page)
    # The socket back: leave, and join again over it (no POST), with the same lobby.
    switch.on = True
    await expect(connection).to_have_attribute("data-state", "live", timeout=30_000)
    await lobby.get_by_role("button", name="Leave the line").click()
    await expect(lobby.get_by_role("button", name="Join the line")).to_be_visible()
    await lobby.get_by_role("button", name="Join the line").click()
    await expect(lobby.locator(".lobby-state")).to_be_focused()
    await expect(lobby.locator(".lobby-headline")).to_have_text("You're in line.")
    await expect(lobby.locator(".lobby-place")).to_have_text("Number 1 in line · 0 ahead of you")
    assert len(joins_posted) == 1


async def test_a_polling_page_without_a_ticket_shows_how_many_wait(
    browser: Browser, site: Service
) -> None:
    """Issue 17: every page sees how many are waiting, with a polling fallback. A page whose
    socket cannot be used, of a shopper with no ticket, had no count at all (the counts came
    only in the socket's `queue` frames): it polls them (GET /api/queues) and the lobby
    shows them, and follows the line as it grows."""
    product = await new_product(site, "Polled stool", 5, queue="fifo", saleStartsAt=soon(600))
    async with shopper(site) as first, shopper(site) as second, shopper(site) as third:
        await join(first, product)
        await join(second, product)
        page = await new_page(browser, DESKTOP, locale="en-GB")
        await page.route_web_socket(re.compile("^ws"), SocketSwitch().handle)
        await page.goto(site.base_url + "/")
        await expect(page.locator("#connection")).to_have_attribute(
            "data-state", "polling", timeout=10_000
        )
        lobby = card(page, product).locator(".lobby")
        await expect(lobby.get_by_role("button", name="Join the line")).to_be_visible()
        count = lobby.locator(".lobby-count")
        await expect(count).to_have_text("2 people waiting", timeout=15_000)
        await join(third, product)
        await expect(count).to_have_text("3 people waiting", timeout=15_000)
        await assert_accessible(page)


# -- the console ---------------------------------------------------------------------------


async def test_the_console_shows_the_waiting_rooms_and_sets_them(
    browser: Browser, site: Service
) -> None:
    # A drop starting in ten minutes, a dozen shoppers in its line already.
    vinyl = await new_product(site, "Limited vinyl", 50, queue="random", saleStartsAt=soon(600))
    for _ in range(12):
        async with shopper(site) as client:
            await join(client, vinyl)
    page = await open_console(browser, site, DESKTOP, locale="en-GB")
    vinyl_row = page.locator(f'#queue-rows tr[data-id="{vinyl["id"]}"]')
    await expect(vinyl_row.locator(".mode")).to_have_text("Random draw at the start")
    await expect(vinyl_row.locator(".waiting")).to_have_text("12")
    await expect(vinyl_row.locator(".admitted")).to_have_text("0")

    create = page.locator("#create-form")
    await create.get_by_label("Name").fill("Console drop")
    await create.get_by_label("Price").fill("30")
    await create.get_by_label("Stock", exact=True).fill("2")
    await create.get_by_label("Waiting room").select_option("fifo")
    await create.get_by_label("Admit per unit").fill("1.5")
    await create.get_by_role("button", name="Create").click()
    message = page.locator("#create-message")
    await expect(message).to_have_text(
        re.compile(r"^Created Console drop \(id \d+\) with 2 units and a waiting room")
    )
    found = re.search(r"\(id (\d+)\)", await message.inner_text())
    assert found is not None
    product = {"id": int(found.group(1))}
    await expect(page.locator("#detail-queue")).to_have_text(
        re.compile(r"^In order of arrival, 1\.5 admitted per unit")
    )
    row = page.locator(f'#queue-rows tr[data-id="{product["id"]}"]')
    await expect(row.locator(".mode")).to_have_text("In order of arrival")
    # No start time: a waitlist. Two shoppers join; 2 units × 1.5 lets both in at once, and
    # one of them reserves with their turn.
    async with shopper(site) as one, shopper(site) as two:
        for client in (one, two):
            await join(client, product)
        await wait_for_state(one, product, "admitted")
        await reserve(one, product)
        await expect(row.locator(".used")).to_have_text("1")
        await expect(row.locator(".admitted")).to_have_text("1")
        await expect(row.locator(".waiting")).to_have_text("0")
        await expect(row.locator(".rate")).to_have_text("2")
        await expect(page.locator("#detail-queue")).to_have_text(
            "In order of arrival, 1.5 admitted per unit · 0 waiting, 1 admitted now"
        )
        await page.evaluate("document.activeElement.blur()")
        await assert_accessible(page)
        await page.locator("#queues").scroll_into_view_if_needed()
        await screenshot(page, "admin-queues-desktop", docs=True)
        # The order cannot switch while someone is in the room (409 queue_in_use): the
        # second shopper leaves first.
        left = await two.delete(f"/api/products/{product['id']}/queue")
        assert left.status_code == 204, left.text

    # The settings, in the edit form.
    await page.get_by_text("Edit name, price, start or limit per customer").click()
    edit = page.locator("#edit-form")
    await expect(edit.get_by_label("Waiting room")).to_have_value("fifo")
    await expect(edit.get_by_label("Admit per unit")).to_have_value("1.5")
    await edit.get_by_label("Waiting room").select_option("random")
    await edit.get_by_label("Admit per unit").fill("2")
    await assert_accessible(page)
    await edit.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#detail-queue")).to_have_text(
        re.compile(r"^Random draw at the start, 2 admitted per unit")
    )
    await expect(row.locator(".mode")).to_have_text("Random draw at the start")
    await expect(page.locator("#detail-message")).to_have_text(
        re.compile(r"waiting room: Random draw at the start, 2 admitted per unit\.$")
    )

    phone = await open_console(browser, site, PHONE, locale="en-GB")
    await expect(phone.locator(f'#queue-rows tr[data-id="{vinyl["id"]}"]')).to_be_visible()
    await assert_accessible(phone)


async def test_a_shopper_without_tickets_sees_no_console_errors_for_the_queued_products(
    browser: Browser, site: Service
) -> None:
    """The page asked for the shopper's ticket of every product with a waiting room it
    showed, and `GET /api/products/{id}/queue` answers 404 when they have none (as the API
    documents): a console error in the browser for each such product, at every load. It
    asks only for those `GET /api/me` names (`tickets`)."""
    queued = [
        await new_product(site, f"Queued chair {n}", 5, queue="fifo", saleStartsAt=soon(600))
        for n in range(3)
    ]
    page = await new_page(browser, DESKTOP, locale="en-GB")
    errors: list[str] = []

    def heard(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", heard)
    await page.goto(site.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    for product in queued:
        lobby = card(page, product).locator(".lobby")
        await expect(lobby.get_by_role("button", name="Join the line")).to_be_visible()
    assert errors == []
    # Once joined, a reload asks for that ticket, and still shows no error.
    await (
        card(page, queued[0]).locator(".lobby").get_by_role("button", name="Join the line").click()
    )
    await expect(card(page, queued[0]).locator(".lobby-headline")).to_have_text("You're in line.")
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(card(page, queued[0]).locator(".lobby-headline")).to_have_text("You're in line.")
    await expect(
        card(page, queued[1]).locator(".lobby").get_by_role("button", name="Join the line")
    ).to_be_visible()
    assert errors == []


async def test_a_polling_page_asks_only_for_the_shoppers_own_tickets(
    browser: Browser, site: Service
) -> None:
    """While its socket cannot be used the page polls the tickets it follows: it followed
    every product with a waiting room it showed, so a shopper without a ticket in them had
    a `GET /api/products/{id}/queue` answered 404 (as documented) for each, every poll (3 s),
    each an error in the browser's console: what the page's load no longer does (it asks
    only for those `GET /api/me` names)."""
    for n in range(2):
        await new_product(site, f"Polled lamp {n}", 5, queue="fifo", saleStartsAt=soon(600))
    page = await new_page(browser, DESKTOP, locale="en-GB")
    await page.route_web_socket(re.compile("^ws"), SocketSwitch().handle)
    errors: list[str] = []
    tickets: list[str] = []
    polls: list[str] = []

    def heard(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    def asked(request: Request) -> None:
        if request.method == "GET" and re.search(r"/api/products/\d+/queue", request.url):
            tickets.append(request.url)
        elif request.method == "GET" and re.search(r"/api/products(\?|$)", request.url):
            polls.append(request.url)

    page.on("console", heard)
    page.on("request", asked)
    await page.goto(site.base_url + "/")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "polling", timeout=10_000
    )
    seen = len(polls)
    async with page.expect_request(re.compile(r"/api/products(\?|$)"), timeout=15_000):
        pass
    async with page.expect_request(re.compile(r"/api/products(\?|$)"), timeout=15_000):
        pass
    assert len(polls) >= seen + 2
    assert tickets == []
    assert errors == []
