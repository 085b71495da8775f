"""The console's shop integration, as an operator uses it: check the books, register the
shop's webhook endpoint (its secret shown once), watch a delivery arrive and redeliver it,
make and revoke a shop API key, delete the endpoint; every state checked with axe-core."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import Browser, Dialog, expect

from server.devtools.processes import Service
from tests.browser import SIZES, assert_accessible, new_product, open_console, reserve, serve
from tests.receiver import Receiver

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from serve(
        tmp_path_factory.mktemp("integration"),
        WEBHOOK_POLL_MS="50",
        WEBHOOK_ALLOW_LOCAL_NETWORK="true",  # the receiver is on 127.0.0.1
    )


async def test_an_operator_connects_the_shop(browser: Browser, site: Service) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        page = await open_console(browser, site, SIZES["desktop"])
        await page.get_by_role("button", name="Check the books now").click()
        await expect(page.locator("#books-message")).to_contain_text("The books add up")

        form = page.locator("#webhook-form")
        await form.get_by_label("URL").fill(receiver.url)
        await form.get_by_label("Description").fill("Order service")
        await form.get_by_role("button", name="Add endpoint").click()
        secret = page.locator("#webhook-secret-value")
        await expect(secret).to_contain_text("whsec_")
        receiver.secret = await secret.inner_text()
        row = page.locator("#webhook-rows tr", has_text=receiver.url)
        await expect(row).to_contain_text("Enabled")
        await assert_accessible(page)

        product = await new_product(site, "Hooked lamp", 3)
        held = await reserve(site, product["id"], 1)
        await receiver.wait_for(1)
        (first,) = receiver.received
        assert first.body["data"]["reservation"]["id"] == held["id"]

        await row.get_by_role("button", name="Deliveries").click()
        delivery = page.locator("#delivery-rows tr", has_text="reservation.created")
        await expect(delivery).to_contain_text("Delivered")
        await delivery.get_by_role("button", name="Redeliver").click()
        await expect(page.locator("#deliveries-message")).to_contain_text("will be sent again")
        await receiver.wait_for(1)
        await receiver_gets_twice(receiver, first.id)
        await assert_accessible(page)

        keys = page.locator("#key-form")
        await keys.get_by_label("Used by").fill("Checkout")
        await keys.get_by_role("button", name="Make a key").click()
        await expect(page.locator("#key-secret-value")).to_contain_text("fsk_")
        key_row = page.locator("#key-rows tr", has_text="Checkout")
        await expect(key_row).to_contain_text("Active")
        await key_row.get_by_role("button", name="Revoke").click()
        await expect(key_row).to_contain_text("Revoked")
        await assert_accessible(page)

        # Deleting the endpoint, once the operator confirms what it drops: gone from the
        # list and from the API.
        asked: list[str] = []

        async def confirm(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept()

        page.once("dialog", confirm)
        await row.get_by_role("button", name=f"Delete {receiver.url}").click()
        await expect(page.locator("#webhook-message")).to_contain_text("deleted")
        await expect(page.locator("#webhook-rows tr", has_text=receiver.url)).to_have_count(0)
        assert asked
        assert receiver.url in asked[0]
        assert "delivery history" in asked[0]
        await expect(page.locator("#webhooks-empty")).to_be_visible()
        await assert_accessible(page)
        async with site.client() as client:
            listed = await client.get("/api/admin/webhooks", headers=site.admin_headers())
        assert listed.json() == []
    finally:
        await receiver.stop()


async def receiver_gets_twice(receiver: Receiver, event_id: str) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + 20
    while [r.id for r in receiver.received].count(event_id) < 2:
        assert time.monotonic() < deadline, "the redelivery did not arrive"
        await asyncio.sleep(0.05)
