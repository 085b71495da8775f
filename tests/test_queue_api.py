"""The waiting room over HTTP (issue 17): join, read (with ETag), leave; the refusals; the
gate on reservations; the operator's settings and figures. The app runs in this process,
with its admitter, on both databases.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from server.api import queue
from server.storage.database import Store
from server.wire.schemas import QueueCountsOut, RoomOut, TicketOut
from tests.support import assert_invariant, eventually, serve
from tests.test_api import app_settings, assert_error
from tests.test_shoppers import Shop, reserve


@pytest.fixture
async def shop(database_url: str, redis_url: str, store: Store) -> AsyncIterator[Shop]:
    settings = app_settings(
        database_url, redis_url, session_secret="q" * 32, pass_seconds=30.0, queue_tick_ms=50
    )
    async for client in serve(settings):
        yield Shop(client, store)


def starts_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def ticket_of(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    TicketOut.model_validate(body)
    return body


async def test_join_read_and_leave(shop: Shop) -> None:
    product = await shop.product(5, queue="fifo", saleStartsAt=starts_in(600))
    assert product["queue"] == "fifo"
    assert product["admitFactor"] == 1.0
    path = f"/api/products/{product['id']}/queue"
    shopper = await shop.shopper()
    joined = ticket_of(await shopper.post(path), 201)
    assert joined["state"] == "waiting"
    assert joined["position"] == 1
    assert joined["ahead"] == 0
    assert joined["passExpiresAt"] is None
    assert "sale starts" in joined["message"]
    again = ticket_of(await shopper.post(path), 200)
    assert again["joinedAt"] == joined["joinedAt"]
    # At the root too, like the rest of the shopper API.
    assert ticket_of(await shopper.get(f"/products/{product['id']}/queue"))["state"] == "waiting"
    read = await shopper.get(path)
    ticket_of(read)
    etag = read.headers["etag"]
    assert (await shopper.get(path, headers={"If-None-Match": etag})).status_code == 304
    second = await shop.shopper()
    assert ticket_of(await second.post(path), 201)["position"] == 2
    assert (await shopper.delete(path)).status_code == 204
    left = ticket_of(await shopper.get(path, headers={"If-None-Match": etag}))
    assert left["state"] == "left"
    assert left["position"] is None
    await eventually(
        lambda: _position(second, path, 1), what="the second shopper moving up to number 1"
    )


async def _position(client: httpx.AsyncClient, path: str, wanted: int) -> bool:
    return bool((await client.get(path)).json()["position"] == wanted)


async def test_the_refusals_say_why(shop: Shop) -> None:
    plain = await shop.product(5)
    shopper = await shop.shopper()
    assert_error(await shopper.post(f"/api/products/{plain['id']}/queue"), 409, "queue_off")
    later = await shop.product(5, queue="random", saleStartsAt=starts_in(7200))
    body = assert_error(
        await shopper.post(f"/api/products/{later['id']}/queue"), 409, "queue_not_open"
    )
    opens = datetime.fromisoformat(body["opensAt"])
    starts = datetime.fromisoformat(later["saleStartsAt"])
    assert starts - opens == timedelta(seconds=1800)
    assert body["opensAt"] in body["message"]
    assert_error(await shopper.get(f"/api/products/{plain['id']}/queue"), 404, "no_ticket")
    assert_error(await shopper.post("/api/products/999999/queue"), 404, "product_not_found")
    assert_error(await shopper.post("/api/products/abc/queue"), 404, "product_not_found")
    nobody = httpx.AsyncClient(transport=shop.app._transport, base_url="http://shop.test")
    assert_error(await nobody.post(f"/api/products/{later['id']}/queue"), 401, "no_shopper")


async def test_a_reservation_needs_a_pass_while_the_room_is_active(shop: Shop) -> None:
    product = await shop.product(1, queue="fifo", saleStartsAt=starts_in(1.0))
    path = f"/api/products/{product['id']}/queue"
    first, second, stranger = [await shop.shopper() for _ in range(3)]
    ticket_of(await first.post(path), 201)
    ticket_of(await second.post(path), 201)
    # The sale starts; the admitter admits as many as there are units: one.
    admitted = await eventually(
        lambda: _state(first, path, "admitted"), within=15, what="the first shopper admitted"
    )
    assert admitted["passExpiresAt"] is not None
    assert "your turn" in admitted["message"]
    refused = assert_error(await reserve(second, product["id"]), 403, "not_admitted")
    assert refused["position"] in (1, 2)  # positions here may be a second old
    refused = await eventually(
        lambda: _refused_at(second, product["id"], 1), what="the refusal saying number 1"
    )
    assert "number 1" in refused["message"]
    assert (
        assert_error(await reserve(stranger, product["id"]), 403, "not_admitted")["position"]
        is None
    )
    held = await reserve(first, product["id"])
    assert held.status_code == 201, held.text
    assert (await first.get(path)).json()["state"] == "reserved"
    waiting = ticket_of(await second.get(path))
    assert waiting["heldUnits"] == 1
    assert "1 unit is held and may come back" in waiting["message"]
    # The hold is cancelled: its unit goes to the next in line at once.
    cancel = await first.post(f"/api/reservations/{held.json()['id']}/cancel")
    assert cancel.status_code == 200
    await eventually(lambda: _state(second, path, "admitted"), what="the next one admitted")
    assert (await reserve(second, product["id"])).status_code == 201
    await assert_invariant(shop.store, product["id"])


async def _refused_at(client: httpx.AsyncClient, product_id: int, position: int) -> dict[str, Any]:
    """The refusal, if it names `position`; {} (not yet) otherwise."""
    body = assert_error(await reserve(client, product_id), 403, "not_admitted")
    return body if body["position"] == position else {}


async def _state(client: httpx.AsyncClient, path: str, state: str) -> dict[str, Any]:
    """The ticket, if it is in `state`; {} (not yet) otherwise."""
    body: dict[str, Any] = (await client.get(path)).json()
    return body if body.get("state") == state else {}


async def test_every_page_reads_how_many_wait_without_a_ticket(shop: Shop) -> None:
    """Issue 17: every page sees how many are waiting; one that polls (no socket) and holds
    no ticket reads it from GET /api/queues, the counts the socket's `queue` frames carry,
    with an ETag to poll it by. No shopper is needed; only products with a room are listed."""
    product = await shop.product(1, queue="fifo", saleStartsAt=starts_in(600))
    plain = await shop.product(5)
    path = f"/api/products/{product['id']}/queue"
    for _ in range(3):
        ticket_of(await (await shop.shopper()).post(path), 201)
    page = httpx.AsyncClient(transport=shop.app._transport, base_url="http://shop.test")
    ids = f"{product['id']},{plain['id']},999999"

    async def counts(waiting: int, admitted: int) -> httpx.Response | None:
        response = await page.get(f"/api/queues?ids={ids}")
        assert response.status_code == 200, response.text
        wanted = [{"productId": product["id"], "waiting": waiting, "admitted": admitted}]
        return response if response.json() == wanted else None

    read = await eventually(lambda: counts(3, 0), within=30, what="three waiting")
    assert read is not None
    for one in read.json():
        QueueCountsOut.model_validate(one)
    assert read.headers["cache-control"] == "no-cache"
    etag = read.headers["etag"]
    again = await page.get(f"/api/queues?ids={ids}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.headers["etag"] == etag
    # Every room without `ids`, and at the root like the rest of the shopper API.
    for every in ("/api/queues", "/queues"):
        listed = (await page.get(every)).json()
        assert {"productId": product["id"], "waiting": 3, "admitted": 0} in listed
        assert plain["id"] not in [one["productId"] for one in listed]
    # The operator starts the sale now: the one unit admits the head of the line.
    started = await shop.admin(
        "PATCH", f"/api/admin/products/{product['id']}", json={"saleStartsAt": starts_in(0)}
    )
    assert started.status_code == 200, started.text
    moved = await eventually(lambda: counts(2, 1), within=30, what="one admitted, two waiting")
    assert moved is not None
    assert moved.headers["etag"] != etag
    stale = await page.get(f"/api/queues?ids={ids}", headers={"If-None-Match": etag})
    assert stale.status_code == 200
    for bad in ("ids=", "ids=abc", "ids=0", "limit=0", "after=-1", f"ids={ids}&limit=5", "x=1"):
        assert_error(await page.get(f"/api/queues?{bad}"), 400, "invalid_request")


async def test_without_ids_the_rooms_someone_is_in_are_listed_a_page_at_a_time(
    shop: Shop,
) -> None:
    """A shop keeps every past sale's room. Asked without `ids`, GET /api/queues listed every
    product with a room, and each answer walked them all, however old: now it lists the
    rooms someone is in (a ticket waiting or holding a pass) whose sale has not ended, a page
    at a time (`limit`, `after`, and the `Link` header to the next page, as the console's
    lists). A room nobody joined, and one whose sale ended (its tickets end with it), are
    left out; asked for by id they are answered (0 and 0)."""
    rooms = [await shop.product(1, queue="fifo", saleStartsAt=starts_in(600)) for _ in range(3)]
    empty = await shop.product(1, queue="fifo", saleStartsAt=starts_in(600))
    ended = await shop.product(1, queue="fifo", saleStartsAt=starts_in(-60))
    for product in [*rooms, ended]:
        ticket_of(await (await shop.shopper()).post(f"/api/products/{product['id']}/queue"), 201)
    over = await shop.admin("POST", f"/api/admin/products/{ended['id']}/end")
    assert over.status_code == 200, over.text
    page = httpx.AsyncClient(transport=shop.app._transport, base_url="http://shop.test")
    wanted = [{"productId": p["id"], "waiting": 1, "admitted": 0} for p in rooms]

    async def listed() -> list[dict[str, Any]] | None:
        answer = await page.get("/api/queues")
        assert answer.status_code == 200, answer.text
        assert "link" not in answer.headers
        found: list[dict[str, Any]] = answer.json()
        return found if found == wanted else None

    await eventually(listed, within=30, what="the three rooms someone is in, alone")
    first = await page.get("/api/queues?limit=2")
    assert first.json() == wanted[:2]
    link = f'</api/queues?after={rooms[1]["id"]}&limit=2>; rel="next"'
    assert first.headers["link"] == link
    second = await page.get(f"/api/queues?after={rooms[1]['id']}&limit=2")
    assert second.json() == wanted[2:]
    assert "link" not in second.headers
    at_root = await page.get("/queues?limit=1")
    assert at_root.headers["link"] == f'</queues?after={rooms[0]["id"]}&limit=1>; rel="next"'
    closed = [
        {"productId": empty["id"], "waiting": 0, "admitted": 0},
        {"productId": ended["id"], "waiting": 0, "admitted": 0},
    ]

    async def by_id() -> bool:
        found: list[dict[str, Any]] = (
            await page.get(f"/api/queues?ids={empty['id']},{ended['id']}")
        ).json()
        return found == closed

    await eventually(by_id, within=30, what="the rooms not listed, answered by id")


async def test_a_page_whose_next_page_appears_is_not_answered_not_modified(shop: Shop) -> None:
    """The ETag of a page of rooms was the hash of its body alone. When a room past the page
    filled, the page's body stayed the same and its answer gained a `Link` to the next
    page, but a client polling with If-None-Match was told 304, Not Modified, and so never
    learnt that there was a next page to read: the ETag covers the `Link` too."""
    first = await shop.product(1, queue="fifo", saleStartsAt=starts_in(600))
    later = await shop.product(1, queue="fifo", saleStartsAt=starts_in(600))
    ticket_of(await (await shop.shopper()).post(f"/api/products/{first['id']}/queue"), 201)
    page = httpx.AsyncClient(transport=shop.app._transport, base_url="http://shop.test")
    wanted = [{"productId": first["id"], "waiting": 1, "admitted": 0}]

    async def alone() -> httpx.Response | None:
        answer = await page.get("/api/queues?limit=1")
        return answer if answer.json() == wanted and "link" not in answer.headers else None

    before = await eventually(alone, within=30, what="the one room someone is in")
    assert before is not None
    etag = before.headers["etag"]
    ticket_of(await (await shop.shopper()).post(f"/api/products/{later['id']}/queue"), 201)

    async def linked() -> httpx.Response | None:
        answer = await page.get("/api/queues?limit=1")
        return answer if "link" in answer.headers else None

    found = await eventually(linked, within=30, what="a link to the next page")
    assert found is not None
    assert found.json() == wanted  # the same body
    again = await page.get("/api/queues?limit=1", headers={"If-None-Match": etag})
    assert again.status_code == 200, "a 304 would keep the page without its next one"
    assert again.headers["link"] == f'</api/queues?after={first["id"]}&limit=1>; rel="next"'
    assert again.headers["etag"] != etag


async def test_an_answer_is_made_once_a_second_per_query_and_few_are_kept(shop: Shop) -> None:
    """Each GET /api/queues read the rooms' counts, made the body and hashed it, a 304 as
    dear as a 200: the cost grew with the requests. Now each distinct query's answer (body,
    ETag) is made at most once a second and given to every request of it meanwhile; and as
    a client may vary `ids` without end, at most RENDERED_QUERIES answers are kept."""
    product = await shop.product(1, queue="fifo", saleStartsAt=starts_in(600))
    ticket_of(await (await shop.shopper()).post(f"/api/products/{product['id']}/queue"), 201)
    app = shop.app._transport.app  # type: ignore[attr-defined]
    # Made at start-up with the other app state, not by the first GET /api/queues.
    assert isinstance(app.state.queue_counts, queue.RenderedCounts)
    assert len(app.state.queue_counts) == 0
    room = app.state.room
    made = 0
    real = room.counts

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal made
        made += 1
        return await real(*args, **kwargs)

    room.counts = counted
    page = httpx.AsyncClient(transport=shop.app._transport, base_url="http://shop.test")
    path = f"/api/queues?ids={product['id']}"
    etag = (await page.get(path)).headers["etag"]
    made = 0
    answers = [
        await page.get(path, headers={"If-None-Match": etag} if n % 2 else {}) for n in range(60)
    ]
    assert {a.status_code for a in answers} <= {200, 304}
    # Within a second or so, two answers made at most (one more when the counts the first
    # carried were about to be read again).
    assert made <= 3, made
    for n in range(queue.RENDERED_QUERIES + 50):
        assert (
            await page.get(f"/api/queues?ids={product['id']},{n + 1_000_000}")
        ).status_code == 200
    assert len(app.state.queue_counts) == queue.RENDERED_QUERIES


async def test_the_operator_sets_the_room_and_reads_its_figures(shop: Shop) -> None:
    product = await shop.product(3, saleStartsAt=starts_in(600))
    edited = await shop.admin(
        "PATCH",
        f"/api/admin/products/{product['id']}",
        json={"queue": "random", "admitFactor": 1.5},
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["queue"] == "random"
    assert edited.json()["admitFactor"] == 1.5
    for bad in ({"queue": "lottery"}, {"admitFactor": 0}, {"admitFactor": None}, {"queue": None}):
        response = await shop.admin("PATCH", f"/api/admin/products/{product['id']}", json=bad)
        assert_error(response, 400, "invalid_request")
    shopper = await shop.shopper()
    joined = ticket_of(await shopper.post(f"/api/products/{product['id']}/queue"), 201)
    assert joined["position"] is None  # a random room: drawn at the start
    assert joined["drawAt"] == edited.json()["saleStartsAt"]
    figures = await shop.admin("GET", f"/api/admin/products/{product['id']}/queue")
    assert figures.status_code == 200, figures.text
    body = figures.json()
    RoomOut.model_validate(body)
    assert body["waiting"] == 1
    assert body["queue"] == "random"
    no_token = await shop.app.get(f"/api/admin/products/{product['id']}/queue")
    assert_error(no_token, 401, "unauthorized")
