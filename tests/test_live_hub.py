"""The hub's isolation of slow sockets, in process.

A socket's buffer fills only after megabytes, so the end-to-end tests (test_live.py) cannot
make a send wait in reasonable time. Here sockets are stand-ins whose send waits until the
test releases it, as uvicorn's does while a transport's buffer is full; the hub under test
is the real one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import time
import types
import weakref
from typing import Any, TypeVar

import pytest
from pydantic_core import to_json
from starlette.datastructures import QueryParams
from starlette.websockets import WebSocketState
from websockets.frames import Frame, Opcode

from server.domain import waitingroom
from server.domain.clock import now_ms, parse_iso
from server.domain.model import Product
from server.domain.waitingroom import Lineup, RoomChanged, Ticket, TicketState
from server.infra.metrics import DEFERRED, QUEUE_JOIN_DURATION
from server.live import hub as live
from server.live import subscriber as subscriber_module
from server.live.hub import MESSAGE_BURST, Hub
from server.live.subscriber import Subscriber
from server.live.wsprotocol import EXTENSION, prepare_text
from server.service.catalog import Catalog
from server.service.waitingroom import WaitingRoom
from server.storage.database import Store
from server.storage.errors import StorageError
from server.wire.frames import room_from_message, room_message
from server.wire.schemas import ticket_view
from tests.support import eventually, make_product, product_in_memory
from tests.test_waitingroom import writer_held


class Socket:
    """Just enough of Starlette's WebSocket for the hub; `send_text` waits while blocked."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"extensions": {}}
        self.sent: list[str] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed_with: int | None = None
        self.closed_saying: str | None = None
        self.application_state = WebSocketState.CONNECTED

    async def send_text(self, text: str) -> None:
        await self.writable.wait()
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = code
        self.closed_saying = reason
        self.application_state = WebSocketState.DISCONNECTED


def catalog_of(*product_ids: int) -> Catalog:
    """A catalog of these products (news of a room is told only for a product the catalog
    has: `Hub._room_news`)."""
    catalog = Catalog()
    for product_id in product_ids:
        catalog.apply(product_in_memory(id=product_id))
    return catalog


def stock(product_id: int, available: int, version: int) -> tuple[dict[str, Any], bytes]:
    frame = {
        "type": "stock",
        "productId": product_id,
        "availableStock": available,
        "version": version,
    }
    return frame, to_json(frame)


def versions(socket: Socket) -> list[int]:
    return [int(t.split('"version":')[1].rstrip("}")) for t in socket.sent if '"stock"' in t]


async def test_a_blocked_socket_delays_no_one_and_gets_only_the_newest_frame() -> None:
    hub = Hub(Catalog(), max_clients=10)
    slow, fast = Socket(), Socket()
    slow_client = hub.join(slow)  # type: ignore[arg-type]
    hub.join(fast)  # type: ignore[arg-type]
    slow.writable.clear()  # its buffer is full from now on

    for version in (1, 2, 3):
        hub.publish(*stock(7, 10 - version, version))
        hub.flush()
    assert versions(fast) == [1, 2, 3]  # delivered at once, in order, despite `slow`
    assert versions(slow) == []

    slow.writable.set()  # the buffer drains
    await eventually(lambda: _true(versions(slow) == [1, 3]), what="the backlog to drain")
    # 1 was already on its way when the socket blocked; 2 was superseded by 3.
    assert slow_client in hub.clients


async def test_a_socket_that_stays_blocked_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "SEND_TIMEOUT_SECONDS", 0.2)
    hub = Hub(Catalog(), max_clients=10)
    stuck, fine = Socket(), Socket()
    stuck_client = hub.join(stuck)  # type: ignore[arg-type]
    hub.join(fine)  # type: ignore[arg-type]
    stuck.writable.clear()
    hub.publish(*stock(7, 9, 1))
    hub.flush()
    await eventually(lambda: _true(stuck_client not in hub.clients), what="the stuck one to go")
    assert hub.dropped == 1
    hub.publish(*stock(7, 8, 2))
    hub.flush()
    assert versions(fine) == [1, 2]


async def test_a_full_hub_says_so() -> None:
    hub = Hub(Catalog(), max_clients=2)
    hub.join(Socket())  # type: ignore[arg-type]
    assert not hub.full
    hub.join(Socket())  # type: ignore[arg-type]
    assert hub.full


async def test_older_versions_are_never_sent_after_newer_ones() -> None:
    hub = Hub(Catalog(), max_clients=10)
    socket = Socket()
    hub.join(socket)  # type: ignore[arg-type]
    hub.publish(*stock(7, 5, 5))
    hub.flush()
    hub.publish(*stock(7, 6, 4))  # a late frame from another process
    hub.publish(*stock(7, 4, 6))
    hub.publish(*stock(7, 3, 5))
    hub.flush()
    assert versions(socket) == [5, 6]


async def _true(value: bool) -> bool:
    await asyncio.sleep(0)
    return value


# -- the waiting room's ticket frames (issue 17) -----------------------------------------------


class Room:
    """Just enough of the waiting room for the hub: one line, its tickets, as the test sets
    them."""

    def __init__(self, product_id: int, places: list[int], tickets: list[Ticket]) -> None:
        self.product_id = product_id
        self.places = places
        self.tickets = {t.shopper_id: t for t in tickets}

    def any_rooms(self) -> bool:
        return True

    async def line(self, product_id: int, *, max_age: float = 1.0) -> Lineup:
        return Lineup(
            product_id=product_id,
            at=1,
            places=tuple(sorted(self.places)),
            admitted=0,
        )

    def cached_line(self, product_id: int) -> Lineup | None:
        return None

    def fresh_line(self, product_id: int) -> Lineup | None:
        return None  # none read lately: `joined` reads the line

    async def tickets_of_shopper(self, shopper_id: str) -> list[Ticket]:
        found = self.tickets.get(shopper_id)
        return [] if found is None else [found]

    async def tickets_of(self, product_id: int, shopper_ids: list[str]) -> list[Ticket]:
        return [self.tickets[s] for s in shopper_ids if s in self.tickets]


def positions(socket: Socket) -> list[int | None]:
    return [
        json.loads(text)["ticket"]["position"] for text in socket.sent if '"type":"ticket"' in text
    ]


class UnreachableRoom(Room):
    """`Room` whose database cannot be reached while `down` is set: reading its line fails
    as the store's reads fail then (StorageError)."""

    down = True

    async def line(self, product_id: int, *, max_age: float = 1.0) -> Lineup:
        if self.down:
            raise StorageError("the database cannot be reached")
        return await super().line(product_id, max_age=max_age)


async def test_a_join_whose_line_cannot_be_read_is_answered_unavailable() -> None:
    """A join made (its ticket committed) whose line cannot then be read (the database gone
    between the two) is answered with an `unavailable` error frame naming the product; the
    error ended the answering task before, and the page waited for an answer that never
    came. Once the line can be read, the next round of positions tells the ticket."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    mine = Ticket(5, "anon:me", 20, TicketState.WAITING, joined_at=2)
    room = UnreachableRoom(5, [10, 20], [])
    hub = Hub(catalog, max_clients=10, room=room)  # type: ignore[arg-type]
    socket = Socket()
    client = hub.join(socket)  # type: ignore[arg-type]
    await hub.identify(client, "anon:me")
    await hub.joined(client, mine)

    def errors() -> list[dict[str, Any]]:
        return [f for f in map(json.loads, socket.sent) if f["type"] == "error"]

    await eventually(lambda: _true(len(errors()) == 1), what="the join's answer")
    assert [(f["code"], f["productId"]) for f in errors()] == [("unavailable", 5)]
    assert positions(socket) == []
    room.down = False
    await hub._tell_positions()
    await eventually(lambda: _true(positions(socket) == [2]), what="the ticket, told later")


async def _fifo_room(store: Store) -> tuple[Product, Catalog, WaitingRoom]:
    """A product of 3 units with a `fifo` room, in the database and in a catalog, and its
    process's waiting room, started (the caller stops it)."""
    product = await make_product(store, 3)
    await store.write(
        lambda conn: conn.execute(
            "UPDATE products SET queue = 'fifo' WHERE id = :p", {"p": product.id}
        )
    )
    catalog = Catalog()
    catalog.apply(dataclasses.replace(product, queue="fifo"))
    room = WaitingRoom(store, publish=lambda news: None, opens_ms=0, catalog=catalog)
    await room.start()
    return product, catalog, room


async def test_a_join_taken_once_the_joins_have_stopped_is_answered_unavailable(
    store: Store,
) -> None:
    """A join taken in the socket's protocol (`take_join`) after the process's joins have
    stopped (it is shutting down: `WaitingRoom.stop`) is answered with an `unavailable`
    error frame naming the product, and nothing is made. The RuntimeError of the stopped
    batcher escaped the protocol's `data_received` before, which closes the connection."""
    product, catalog, room = await _fifo_room(store)
    await room.stop()
    hub = Hub(catalog, max_clients=10, room=room)
    socket = Socket()
    client = hub.join(socket)  # type: ignore[arg-type]
    await hub.identify(client, "anon:me")
    client.handling = False  # its task waits for a message, as `live_updates`'s does
    assert hub.take_join(client, f'{{"type":"join","productId":{product.id}}}')

    def errors() -> list[dict[str, Any]]:
        return [f for f in map(json.loads, socket.sent) if f["type"] == "error"]

    await eventually(lambda: _true(len(errors()) == 1), what="the join's answer")
    assert [(f["code"], f["productId"]) for f in errors()] == [("unavailable", product.id)]
    async with store.reader() as conn:
        assert await waitingroom.get_ticket(conn, product.id, "anon:me") is None


async def test_a_line_that_only_grows_at_the_back_tells_nobody_a_new_position() -> None:
    """Joins go to the back: nobody's standing changes, and the line's total reaches pages
    in `queue` frames. With 15,000 pages in a filling line, a view for each every second was
    a web process's whole CPU (bench `queue`). Someone ahead leaving moves those behind."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    mine = Ticket(5, "anon:me", 20, TicketState.WAITING, joined_at=2)
    room = Room(5, [10, 20], [mine])
    hub = Hub(catalog, max_clients=10, room=room)  # type: ignore[arg-type]
    socket = Socket()
    client = hub.join(socket)  # type: ignore[arg-type]
    await hub.identify(client, "anon:me")
    await hub._tell_positions()
    await eventually(lambda: _true(positions(socket) == [2]), what="the ticket on connect")

    room.places += [30, 40, 50]  # three more join, behind
    await hub._tell_positions()
    await asyncio.sleep(0.05)
    assert positions(socket) == [2]

    room.places.remove(10)  # the one ahead is admitted
    await hub._tell_positions()
    await eventually(lambda: _true(positions(socket) == [2, 1]), what="the new position")


async def test_positions_wait_while_the_loop_is_behind_and_come_once_it_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round of positions is a ticket frame to every waiting page (15,000 in the waiting
    room's bench): while the event loop runs its timers late (a sale's first second of
    joins), positions wait, up to POSITIONS_MAX_DEFER_SECONDS; once it is not, they come
    at the next round."""
    monkeypatch.setattr(live, "LINE_SECONDS", 0.05)
    monkeypatch.setattr(live, "POSITIONS_MAX_DEFER_SECONDS", 2.0)
    monkeypatch.setattr(live, "BUSY_HOLD_SECONDS", 1.0)
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    mine = Ticket(5, "anon:me", 20, TicketState.WAITING, joined_at=2)
    room = Room(5, [5, 10, 20], [mine])
    hub = Hub(catalog, max_clients=10, room=room)  # type: ignore[arg-type]
    socket = Socket()
    client = hub.join(socket)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await hub.identify(client, "anon:me")
    await eventually(lambda: _true(positions(socket) == [3]), what="the ticket on connect")

    hogging = True

    async def hog() -> None:  # the loop behind: each turn takes 150 ms of CPU
        while hogging:
            until = time.perf_counter() + 0.15
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    hogger = asyncio.create_task(hog())
    try:
        await eventually(lambda: _true(hub.loop_busy), what="the loop found busy")
        room.places.remove(5)  # the first is admitted: the line moves
        await eventually(lambda: _true(positions(socket) == [3, 2]), what="the deferred position")
        # Not at the next LINE_SECONDS round, but once the deferral ran out.
        assert loop.time() - began >= 2.0 - 0.01
    finally:
        hogging = False
        await hogger
    await eventually(lambda: _true(not hub.loop_busy), what="the loop no longer busy")
    room.places.remove(10)
    await eventually(lambda: _true(positions(socket) == [3, 2, 1]), what="the next, at once")


def states(socket: Socket) -> list[str]:
    tickets = [json.loads(text) for text in socket.sent if '"type":"ticket"' in text]
    return [frame["ticket"]["state"] for frame in tickets]


async def pages_counting_reads(
    catalog: Catalog, room: Room, shoppers: list[str]
) -> tuple[Hub, dict[str, Socket], list[list[str]]]:
    """A hub over `room` with a page of each of `shoppers`, identified; and the reads of
    tickets the hub makes from then on, each the list of shoppers it asked for."""
    reads: list[list[str]] = []
    tickets_of = room.tickets_of

    async def counted(product_id: int, shopper_ids: list[str]) -> list[Ticket]:
        reads.append(list(shopper_ids))
        return await tickets_of(product_id, shopper_ids)

    room.tickets_of = counted  # type: ignore[method-assign]
    hub = Hub(catalog, max_clients=10, room=room)  # type: ignore[arg-type]
    pages = {s: Socket() for s in shoppers}
    for shopper, page in pages.items():
        await hub.identify(hub.join(page), shopper)  # type: ignore[arg-type]
    return hub, pages, reads


async def test_a_room_that_closes_tells_its_pages_from_the_news_without_reading_it() -> None:
    """A step that closes a room (sold out) names whom it closed and when: their pages are
    told `sold_out` from that alone (every web process read the whole room again, 15,000
    tickets in the bench, before telling anyone). A page whose copy is not the ticket that
    was closed (the shopper joined again after the close) reads its ticket instead."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    first = Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)
    second = Ticket(5, "anon:b", 20, TicketState.ADMITTED, joined_at=3, pass_expires_at=10**13)
    again = Ticket(5, "anon:c", 30, TicketState.WAITING, joined_at=50)  # after the close
    room = Room(5, [10, 30], [first, second, again])
    hub, pages, reads = await pages_counting_reads(catalog, room, ["anon:a", "anon:b", "anon:c"])
    room.tickets["anon:c"] = Ticket(5, "anon:c", 30, TicketState.SOLD_OUT, 50, ended_at=60)
    news = {"type": "room", "productId": 5, "waiting": 0, "admitted": 0, "shoppers": []}
    hub.publish(*_room({**news, "closed": ["anon:a", "anon:b", "anon:c"], "closedAt": 40}))
    await eventually(
        lambda: _true(all(states(p)[-1:] == ["sold_out"] for p in pages.values())),
        what="every page told sold_out",
    )
    assert reads == [["anon:c"]]  # only the page whose ticket was not the one closed
    assert states(pages["anon:a"]) == ["waiting", "sold_out"]
    assert states(pages["anon:b"]) == ["admitted", "sold_out"]


async def test_news_made_here_is_told_at_once_and_its_echo_tells_nobody_again() -> None:
    """The admitting process hands its news to its own hub (`room_news`) before Redis
    brings it back: its pages are told then, and the same news from the subscription
    changes nothing and reads nothing."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    first = Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)
    second = Ticket(5, "anon:b", 20, TicketState.WAITING, joined_at=3)
    room = Room(5, [10, 20], [first, second])
    hub, pages, reads = await pages_counting_reads(catalog, room, ["anon:a", "anon:b"])
    news = RoomChanged(5, 0, 0, closed=frozenset({"anon:a", "anon:b"}), closed_at=40, step=1)
    hub.room_news([news])
    await eventually(
        lambda: _true(all(states(p)[-1:] == ["sold_out"] for p in pages.values())),
        what="every page told sold_out",
    )
    hub.publish(*_room(room_message(news)))  # the echo, from the subscription
    await asyncio.sleep(0.05)
    assert all(states(p) == ["waiting", "sold_out"] for p in pages.values())
    assert reads == []


def _echo(news: RoomChanged) -> tuple[dict[str, Any], bytes, RoomChanged]:
    """`news` as the subscription brings it back from Redis: its message through JSON, and
    what the subscription's check made of it (`Hub.publish`'s arguments)."""
    parsed: dict[str, Any] = json.loads(to_json(room_message(news)))
    return _room(parsed)


def _room(frame: dict[str, Any]) -> tuple[dict[str, Any], bytes, RoomChanged]:
    """A room message as the subscription passes it on, checked (`Hub.publish`'s arguments)."""
    return frame, to_json(frame), room_from_message(frame)


async def test_news_of_a_step_not_newer_than_one_told_neither_rolls_the_counts_back_nor_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each admission step's news carries the step's number (`RoomChanged.step`), and a hub
    tells a room's news only if its step is newer than the newest it has told. The
    admitting process tells its pages its news at once (`room_news`); the same news comes
    back from Redis later, after the next step's news was told here: the echo must not put
    the line's older counts back (the pages' `queue` frame said 10 waiting again, for
    QUEUE_FRAME_SECONDS, after 6), nor have a room read again that the news itself had this
    process read whole (`everyone`). Nor may an older step's news that arrives after a newer
    one (from the process that admitted before a takeover), even with counts equal to some
    step's: matching counts, as this once did, cannot tell two steps apart. An older step's
    admissions still reach a page that was not told them (they change only a waiting copy)."""
    monkeypatch.setattr(live, "QUEUE_FRAME_SECONDS", 0.2)
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=3))
    ticket = Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)
    late = Ticket(5, "anon:b", 20, TicketState.WAITING, joined_at=2)
    room = Room(5, [10, 20], [ticket, late])
    hub, pages, reads = await pages_counting_reads(catalog, room, ["anon:a", "anon:b"])

    async def whole_room(product_id: int) -> list[Ticket]:
        reads.append(["everyone"])
        return list(room.tickets.values())

    room.tickets_of_room = whole_room  # type: ignore[attr-defined]
    first = RoomChanged(5, 10, 2, everyone=True, step=1)
    second = RoomChanged(5, 6, 4, step=2)
    hub.room_news([first])
    await eventually(lambda: _true(len(reads) == 1), what="the room read once")
    hub.room_news([second])
    hub.publish(*_echo(first))  # Redis brings the first back after the second was told
    page = pages["anon:a"]
    await eventually(lambda: _true(queue_counts(page) == [10, 6]), what="10, then 6")
    # The publisher may merge steps' news: the echo of the second came merged with the
    # first's (this process's own news, whose reads it made when it told them).
    hub.publish(*_echo(first.merged(second)))
    await asyncio.sleep(0.6)  # past QUEUE_FRAME_SECONDS: anything due has gone
    assert queue_counts(page) == [10, 6]
    # News of joins (no step) is told whatever steps were told: it carries no counts.
    hub.publish(*_echo(RoomChanged(5, None, None, joined=frozenset({"anon:z"}))))
    # From the subscription, out of order: step 4 (another process's), then step 3, whose
    # counts equal step 1's, and which admitted anon:b, whose page nobody told.
    hub.publish(*_echo(RoomChanged(5, 5, 5, step=4)))
    await eventually(lambda: _true(queue_counts(page)[-1:] == [5]), what="5 told")
    until = 1_796_000_060_000
    room.tickets["anon:b"] = Ticket(
        5, "anon:b", 20, TicketState.ADMITTED, 2, admitted_at=40, pass_expires_at=until
    )
    third = RoomChanged(
        5,
        10,
        2,
        everyone=False,
        shoppers=frozenset({"anon:a"}),
        passed=frozenset({"anon:b"}),
        passed_at=40,
        pass_until=until,
        step=3,
    )
    hub.publish(*_echo(third))
    await eventually(
        lambda: _true(states(pages["anon:b"])[-1:] == ["admitted"]), what="anon:b admitted"
    )
    await asyncio.sleep(0.6)
    assert queue_counts(page) == [10, 6, 5]
    assert states(page) == ["waiting"]
    # The late step's reads are made (it is not an echo of news told here): anon:a's.
    assert reads == [["everyone"], ["anon:a"]], reads


async def test_a_late_step_s_lapsed_pass_still_reaches_its_page() -> None:
    """Process A commits step 3, which lapses anon:a's pass, and is frozen before it
    publishes; its lease lapses and process B steps on (step 4, told to B's pages at once,
    nothing about anon:a). A thaws and publishes step 3: B's hub dropped the shoppers of
    a step not newer than 4, and anon:a's page said "It is your turn" for ever."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=3))
    until = 1_796_000_060_000
    admitted = Ticket(
        5, "anon:a", 10, TicketState.ADMITTED, joined_at=2, admitted_at=3, pass_expires_at=until
    )
    room = Room(5, [], [admitted])
    hub, pages, _ = await pages_counting_reads(catalog, room, ["anon:a"])
    await eventually(lambda: _true(states(pages["anon:a"]) == ["admitted"]), what="admitted")
    # Step 3 (A's, committed) lapsed the pass; step 4 (B's) is told first.
    room.tickets["anon:a"] = Ticket(
        5, "anon:a", 10, TicketState.LAPSED, joined_at=2, admitted_at=3, pass_expires_at=until
    )
    hub.room_news([RoomChanged(5, 0, 0, step=4)])
    hub.publish(*_echo(RoomChanged(5, 0, 0, shoppers=frozenset({"anon:a"}), step=3)))
    await eventually(
        lambda: _true(states(pages["anon:a"])[-1:] == ["lapsed"]),
        what="anon:a told its pass lapsed",
        within=3,
    )


async def test_a_late_step_that_names_everyone_still_reaches_the_pages() -> None:
    """A step's news that names too many (`everyone`: MAX_ROOM_SHOPPERS lapsed, or a
    publisher's merge) carries no names of admitted or closed shoppers: dropped as not
    newer, nothing of it reached anyone. Here step 3 closed the room (sold out)."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    waiting = Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)
    room = Room(5, [10], [waiting])
    hub, pages, _ = await pages_counting_reads(catalog, room, ["anon:a"])
    await eventually(lambda: _true(states(pages["anon:a"]) == ["waiting"]), what="waiting")
    room.tickets["anon:a"] = Ticket(5, "anon:a", 10, TicketState.SOLD_OUT, joined_at=2, ended_at=5)
    room.places = []

    async def whole_room(product_id: int) -> list[Ticket]:
        return list(room.tickets.values())

    room.tickets_of_room = whole_room  # type: ignore[attr-defined]
    hub.room_news([RoomChanged(5, 0, 0, step=4)])
    hub.publish(*_echo(RoomChanged(5, 0, 0, everyone=True, step=3)))
    await asyncio.sleep(0)
    await eventually(
        lambda: _true(states(pages["anon:a"])[-1:] == ["sold_out"]),
        what="anon:a told sold out",
        within=3,
    )


async def test_ended_tickets_are_told_exactly_as_their_views_say() -> None:
    """An ended ticket's frame is its state's template with its own `joinedAt` put in (a
    room that sells out tells every page at once): the same text as its view's, for every
    ended state and any moment of joining."""
    catalog = Catalog()
    product = product_in_memory(id=5, available_stock=0, held_units=2)
    catalog.apply(product)
    tickets = [
        Ticket(5, f"anon:{state}{n}", n, state, joined_at=1_796_000_000_000 + n * 7_777, ended_at=9)
        for state in (TicketState.SOLD_OUT, TicketState.RESERVED, TicketState.LAPSED)
        for n in range(3)
    ]
    room = Room(5, [], tickets)
    hub = Hub(catalog, max_clients=20, room=room)  # type: ignore[arg-type]
    pages = {t.shopper_id: Socket() for t in tickets}
    for shopper, page in pages.items():
        await hub.identify(hub.join(page), shopper)  # type: ignore[arg-type]
    line = await room.line(5)
    for ticket in tickets:
        [sent] = [json.loads(t) for t in pages[ticket.shopper_id].sent if '"ticket"' in t]
        view = ticket_view(ticket, product, line, now=0)
        assert {**sent["ticket"], "serverTime": None} == {**view, "serverTime": None}


async def test_admissions_are_told_from_the_news_without_reading_the_tickets() -> None:
    """A step's news names whom it admitted, when, and until when their passes run: their
    pages are told `admitted` from that alone. On a loop busy with a sale's first joins the
    read of the admitted tickets and of the line took 0.4-0.5 s each, and the first passes
    reached their pages a second after they were made. A page whose copy is not a waiting
    ticket joined before then reads its ticket instead."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=2))
    first = Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)
    later = Ticket(5, "anon:b", 20, TicketState.WAITING, joined_at=50)  # after the step
    room = Room(5, [10, 20], [first, later])
    hub, pages, reads = await pages_counting_reads(catalog, room, ["anon:a", "anon:b"])
    until = 1_796_000_060_000
    room.tickets["anon:b"] = Ticket(
        5, "anon:b", 20, TicketState.ADMITTED, 50, admitted_at=60, pass_expires_at=until
    )
    news = {"type": "room", "productId": 5, "waiting": 0, "admitted": 2, "shoppers": []}
    hub.publish(
        *_room({**news, "passed": ["anon:a", "anon:b"], "passedAt": 40, "passUntil": until})
    )
    await eventually(
        lambda: _true(all(states(p)[-1:] == ["admitted"] for p in pages.values())),
        what="both pages told admitted",
    )
    assert reads == [["anon:b"]]  # only the page whose ticket was not the one admitted
    [told] = [json.loads(t) for t in pages["anon:a"].sent if '"state":"admitted"' in t]
    assert told["ticket"]["passExpiresAt"] == "2026-11-30T00:54:20.000Z"


def queue_counts(socket: Socket) -> list[int]:
    return [json.loads(text)["waiting"] for text in socket.sent if '"type":"queue"' in text]


async def test_a_lines_counts_reach_every_page_at_most_so_often_ending_on_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every join changes a line's count, and each change is a frame for every socket: the
    pages hear the newest count at most every QUEUE_FRAME_SECONDS (here 1 s)."""
    monkeypatch.setattr(live, "QUEUE_FRAME_SECONDS", 1.0)
    hub = Hub(catalog_of(5), max_clients=10)
    socket = Socket()
    hub.join(socket)  # type: ignore[arg-type]
    began = time.monotonic()
    for waiting in range(1, 51):  # fifty joins in a quarter of a second
        hub.publish(*_room({"type": "room", "productId": 5, "waiting": waiting, "admitted": 0}))
        await asyncio.sleep(0.005)
    took = time.monotonic() - began  # longer on a loaded machine: a count a second more
    await eventually(lambda: _true(queue_counts(socket)[-1:] == [50]), what="the newest count")
    # The first at once, then the newest after 1 s (and one a second while they came).
    assert len(queue_counts(socket)) <= 2 + int(took)


async def test_a_flush_goes_out_in_slices_and_every_socket_gets_frames_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop runs other work between slices of a flush (a flush to 15,000 sockets
    held every request for a few hundred ms); a flush due meanwhile waits for it, so that
    no socket sees a newer stock before an older one."""
    monkeypatch.setattr(live, "FLUSH_SLICE", 2)
    hub = Hub(Catalog(), max_clients=10)
    sockets = [Socket() for _ in range(5)]
    for socket in sockets:
        hub.join(socket)  # type: ignore[arg-type]
    hub.publish(*stock(7, 9, 1))
    hub.flush()
    assert sorted(versions(s) for s in sockets) == [[], [], [], [1], [1]]  # one slice
    hub.publish(*stock(7, 8, 2))
    hub.flush()  # due while the first is under way: after it
    await eventually(
        lambda: _true(all(versions(s) == [1, 2] for s in sockets)), what="both, in order"
    )


class Prepared:
    """The `flashsale.prepared_frames` extension of our uvicorn protocol, as the hub sees it:
    each write (one `transport.write`, one send to the kernel) kept."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, frame: bytes) -> bool:
        self.writes.append(frame)
        return True


P = TypeVar("P", bound=Prepared)


def joined_pages(hub: Hub, pages: list[P]) -> list[P]:
    """`pages` (`Prepared` extensions: what each write sends) joined to `hub`, a socket each."""
    for page in pages:
        socket = Socket()
        socket.scope["extensions"][EXTENSION] = page
        hub.join(socket)  # type: ignore[arg-type]
    return pages


async def test_counts_not_yet_due_go_with_a_flush_in_the_same_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Most of a flush's cost is a write to every socket. A line's counts not yet due go with
    a flush of stock frames that goes to every page anyway, in the same write, rather than
    in a flush of their own later (15,000 sockets in the waiting room's bench, flushed every
    MAX_FLUSH_GAP while its sale's stock changes)."""
    monkeypatch.setattr(live, "QUEUE_RIDE_SECONDS", 0.0)
    hub = Hub(catalog_of(5), max_clients=10)
    pages = joined_pages(hub, [Prepared() for _ in range(3)])
    hub.publish(*_room({"type": "room", "productId": 5, "waiting": 1, "admitted": 0}))
    await eventually(lambda: _true(all(len(p.writes) == 1 for p in pages)), what="the first")
    # The next counts are not due for QUEUE_FRAME_SECONDS; a stock change comes meanwhile.
    hub.publish(*_room({"type": "room", "productId": 5, "waiting": 2, "admitted": 0}))
    hub.publish(*stock(5, 9, 1))
    hub.flush()
    await eventually(lambda: _true(all(len(p.writes) == 2 for p in pages)), what="the flush")
    for page in pages:
        last = page.writes[-1].decode(errors="replace")
        assert '"type":"queue"' in last
        assert '"waiting":2' in last
        assert '"type":"stock"' in last
    assert hub._queues == {}  # nothing left to send on its own


class CostlyPage(Prepared):
    """A page whose every write takes the event loop `cost` seconds (the kernel's send to a
    socket, which most of a flush is), stamped with the loop's time it began at."""

    def __init__(self, cost: float) -> None:
        super().__init__()
        self.cost = cost
        self.at: list[float] = []

    def write(self, frame: bytes) -> bool:
        self.at.append(asyncio.get_running_loop().time())
        until = time.perf_counter() + self.cost
        while time.perf_counter() < until:  # the loop busy, as with a real send
            pass
        return super().write(frame)


async def test_flushes_that_cost_much_take_at_most_a_quarter_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While stock keeps changing, a flush comes at least every MAX_FLUSH_GAP, unless one
    costs so much that this would take more than MAX_FANOUT_SHARE of the event loop: then
    the next waits three times the last one's cost after it (a flush to 15,000 sockets
    took 0.2-0.4 s, and at every 0.5 s the joins and reservations of a waiting room's sale
    queued behind them)."""
    monkeypatch.setattr(live, "MAX_FLUSH_GAP", 0.02)
    monkeypatch.setattr(live, "FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(live, "FANOUT_SHARE", 0.01)  # the budget alone would wait longer
    monkeypatch.setattr(live, "FANOUT_BURST", 0.0)  # and has nothing saved up
    hub = Hub(Catalog(), max_clients=20)
    pages = joined_pages(hub, [CostlyPage(0.01) for _ in range(6)])  # a flush: ~60 ms
    hub.publish(*stock(7, 9, 1))
    await eventually(lambda: _true(all(len(p.writes) == 1 for p in pages)), what="the first")
    hub.flush()  # one with nothing for every socket (a watched hold's frame) costs nothing...
    first_cost, first_end = hub._flush_cost, hub._last_flush
    assert first_cost >= 0.05
    hub.publish(*stock(7, 8, 2))  # the stock keeps changing
    await eventually(lambda: _true(all(len(p.writes) == 2 for p in pages)), what="the second")
    began = pages[0].at[-1]  # ...and changes nothing of the wait for the next to all
    # A timer may fire up to the clock's resolution early; a busy machine only makes it later.
    assert began - first_end >= 3 * first_cost - 0.005


async def test_a_lines_counts_come_less_often_where_telling_every_page_costs_much(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line's counts change with every join, and each flush of them is a write to every
    page: before a sale with 15,000 pages in its line, 300,000 writes in its last minute (a
    flush every QUEUE_FRAME_SECONDS, 3 s, each 0.3-0.9 s of the loop). Their own flushes
    take at most QUEUE_FRAME_SHARE of the loop: the next comes the last one's cost over
    that share after it (here 1 s where 0.05 s was asked), and the newest count still
    reaches every page."""
    monkeypatch.setattr(live, "QUEUE_FRAME_SECONDS", 0.05)
    monkeypatch.setattr(live, "QUEUE_FRAME_SHARE", 0.05)
    monkeypatch.setattr(live, "QUEUE_FRAME_MAX_SECONDS", 5.0)
    # The fan-out's own budget alone would let a flush come every 0.15 s here.
    monkeypatch.setattr(live, "FANOUT_SHARE", 1.0)
    monkeypatch.setattr(live, "MAX_FANOUT_SHARE", 0.25)
    hub = Hub(catalog_of(5), max_clients=20)
    pages = joined_pages(hub, [CostlyPage(0.01) for _ in range(5)])  # a flush: ~50 ms
    # A join every 10 ms until the pages have had three flushes (about 2 s; later on a busy
    # machine, where a flush's ~50 ms of writes take longer and the next waits longer).
    deadline = time.monotonic() + 60
    waiting = 0
    while len(pages[0].at) < 3 and time.monotonic() < deadline:
        waiting += 1
        hub.publish(*_room({"type": "room", "productId": 5, "waiting": waiting, "admitted": 0}))
        await asyncio.sleep(0.01)
    newest = f'"waiting":{waiting},'
    await eventually(
        lambda: _true(all(newest in p.writes[-1].decode(errors="replace") for p in pages)),
        what="the newest count on every page",
    )
    at = pages[0].at
    assert len(at) >= 3, at
    # Each flush took >= 50 ms, so >= 1 s between two (a busy machine only makes it later).
    assert min(b - a for a, b in itertools.pairwise(at)) >= 0.9, at


async def test_a_page_that_connects_after_the_counts_stopped_changing_is_told_them() -> None:
    """A room's counts go to the pages connected when they change: a page opened after its
    line stopped changing (filled up before the start, or a waitlist at rest) was never
    told how many wait, so it showed no count, and a waitlist with people in it (no start,
    units left) as open to anyone, offering Reserve (403 `not_admitted`). A new socket is
    told the newest counts the process knows, after its snapshot (those of products still
    in the catalog: a deleted product's room is no news)."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5))
    hub = Hub(catalog, max_clients=10)
    first = Socket()
    hub.join(first)  # type: ignore[arg-type]
    hub.publish(*_room({"type": "room", "productId": 5, "waiting": 3, "admitted": 1}))
    hub.publish(*_room({"type": "room", "productId": 8, "waiting": 4, "admitted": 0}))
    await eventually(
        lambda: _true(any('"waiting":3' in t for t in first.sent)), what="the first page"
    )
    later, other = Socket(), Socket()
    hub.join(later)  # type: ignore[arg-type]
    hub.join(other, products=frozenset({6}))  # type: ignore[arg-type]
    await eventually(
        lambda: _true(any('"type":"queue"' in t and '"waiting":3' in t for t in later.sent)),
        within=3.0,
        what="the counts on the page that connected later",
    )
    assert not any('"productId":8' in t for t in first.sent + later.sent)  # not in the catalog
    assert not any('"type":"queue"' in t for t in other.sent)  # it asked for product 6 only


# -- a client that sends and never reads -----------------------------------------------------


class TalkingSocket(Socket):
    """A socket whose client sends `messages`, as `WS /ws` receives them, and reads only while
    `writable` is set; it counts the messages the server has taken."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__()
        self.scope = {"extensions": {}, "client": ("203.0.113.9", 5000)}
        self.headers: dict[str, str] = {}
        self.query_params = QueryParams("")  # Starlette's own: `/ws` reads `getlist("ids")`
        self._messages = list(messages)
        self.taken = 0
        self.done = asyncio.Event()
        self.app: Any = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        if self.taken == len(self._messages):
            self.done.set()
            await asyncio.Event().wait()  # the client sends nothing more
        self.taken += 1
        return {"type": "websocket.receive", "text": self._messages[self.taken - 1]}


class Identities:
    def shopper_id_or_none(self, websocket: object) -> str | None:
        return "anon:talker"

    def signed_in_until(self, websocket: object) -> float | None:
        return None


async def test_a_client_that_does_not_read_is_taken_no_more_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each `join` is answered with a frame of its own (keyed by its product): a client that
    sent a join for each of a million product ids and read nothing made the server queue a
    frame for each of them until it was dropped, 5 s later (tens of MB from one client).
    The socket's messages are taken only once what it was sent has gone out."""
    monkeypatch.setattr(live, "SEND_TIMEOUT_SECONDS", 30.0)
    hub = Hub(Catalog(), max_clients=10)  # no room: every join gets an `error` frame
    # As many as a socket may send at once (MESSAGE_BURST): past them, messages are refused
    # unread (test_live.py's test_a_socket_past_its_messages_is_refused_then_closed).
    joins = [json.dumps({"type": "join", "productId": n}) for n in range(1, MESSAGE_BURST + 1)]
    socket = TalkingSocket(joins)
    socket.app = type("App", (), {})()
    socket.app.state = type("State", (), {})()
    socket.app.state.hub = hub
    socket.app.state.settings = type("Settings", (), {"cors_origins": ()})()
    socket.app.state.identities = Identities()
    socket.writable.clear()  # the client reads nothing: the snapshot's send waits
    serving = asyncio.create_task(live.live_updates(socket))  # type: ignore[arg-type]
    try:
        for _ in range(50):
            await asyncio.sleep(0)
        assert socket.taken <= 2, f"{socket.taken} messages taken from a client that reads nothing"
        socket.writable.set()  # it reads again: every join is answered, in order
        await asyncio.wait_for(socket.done.wait(), 10)
        await eventually(lambda: _true(len(socket.sent) == 1 + len(joins)), what="every answer")
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    answered = [json.loads(text)["productId"] for text in socket.sent[1:]]
    assert answered == list(range(1, MESSAGE_BURST + 1))


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 1000, 65535, 65536, 70_000])
def test_a_prepared_frame_is_what_websockets_makes(length: int) -> None:
    """`prepare_text` writes the header itself (faster than websockets' general
    `serialize`): byte for byte the frame websockets makes, at each boundary of the
    payload's length field (RFC 6455 §5.2: 7 bits, then 16, then 64), and for text whose
    UTF-8 is longer than its characters."""
    text = ("é" * length)[: length // 2] + "a" * (length - length // 2 * 2)
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert prepare_text(text) == expected
    assert prepare_text("a" * length) == Frame(Opcode.TEXT, b"a" * length).serialize(
        mask=False, extensions=[]
    )


async def _line_of_pages(count: int) -> tuple[Room, Hub, list[Ticket], list[Socket]]:
    """A waiting line of `count` pages for product 5 behind one place (10) at its head: the
    pages' tickets at places 100, 101, …, each page's socket identified as its shopper, and
    every page told its place once (a round of positions)."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    tickets = [
        Ticket(5, f"anon:{n}", 100 + n, TicketState.WAITING, joined_at=2) for n in range(count)
    ]
    room = Room(5, [10, *(t.place for t in tickets)], tickets)
    hub = Hub(catalog, max_clients=count, max_per_client=count, room=room)  # type: ignore[arg-type]
    sockets = []
    for ticket in tickets:
        socket = Socket()
        client = hub.join(socket, key=ticket.shopper_id)  # type: ignore[arg-type]
        await hub.identify(client, ticket.shopper_id)
        sockets.append(socket)
    assert await hub._tell_positions()
    await eventually(
        lambda: _true(all(len(positions(s)) == 1 for s in sockets)), what="every page's place"
    )
    return room, hub, tickets, sockets


async def test_a_round_of_positions_gives_way_and_the_next_tells_the_rest_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round of positions stops between two slices when news of a close or of admissions
    waits (`give_way`): that news is told first (a close once waited 0.7 s behind a round
    in the waiting room's bench). The next round tells every page the stopped one had not
    reached, and none of those it had a second time."""
    monkeypatch.setattr(live, "SLICE_SECONDS", 0.0)  # a slice every SLICE_CHECK_EVERY pages
    room, hub, tickets, sockets = await _line_of_pages(3 * live.SLICE_CHECK_EVERY)

    room.places.remove(10)  # the head is admitted: everyone moves up one
    asked = []

    def give_way() -> bool:
        asked.append(True)
        return len(asked) > 1  # news came during the first slice: stop at its end

    assert not await hub._tell_positions(give_way=give_way)
    assert len(asked) == 2
    told = [s for s in sockets if len(positions(s)) == 2]
    assert len(told) == live.SLICE_CHECK_EVERY  # stopped after one slice

    assert await hub._tell_positions()
    await eventually(
        lambda: _true(all(len(positions(s)) == 2 for s in sockets)), what="the rest told"
    )
    for socket, ticket in zip(sockets, tickets, strict=True):
        assert positions(socket) == [ticket.place - 98, ticket.place - 99]  # each told once


async def test_a_client_that_comes_and_goes_leaves_one_timer_to_forget_its_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client's message allowance is forgotten once its last socket has closed and the
    allowance is full again, by a timer. One timer per client, however often it comes and
    goes: a client that drained its allowance, closed its socket and opened another left a
    timer each time, and each timer set itself again while the allowance was short, so
    one address that kept its allowance drained and its sockets short-lived had the loop
    keep a timer for every socket it had opened. The one timer still forgets it."""
    monkeypatch.setattr(live, "MESSAGE_REFILL_S", 0.01)  # a bucket full again in 0.3 s
    hub = Hub(Catalog(), max_clients=10, max_per_client=1)
    loop = asyncio.get_running_loop()
    call_later = loop.call_later
    pending: set[asyncio.TimerHandle] = set()

    def counting(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        target = getattr(callback, "func", callback)  # a functools.partial's function
        if getattr(target, "__func__", None) is not Hub._forget_allowance:
            return call_later(delay, callback, *args)

        def run() -> None:
            pending.discard(handle)
            callback(*args)

        handle = call_later(delay, run)
        pending.add(handle)
        return handle

    monkeypatch.setattr(loop, "call_later", counting)
    for _ in range(50):
        socket = Socket()
        socket.scope["client"] = ("203.0.113.7", 50_000)  # an anonymous page: its address
        client = hub.join(socket, key="addr:203.0.113.7")  # type: ignore[arg-type]
        while hub.refusal(client) is None:  # its allowance drained: MESSAGE_BURST here
            pass
        hub.leave(client)
    # An anonymous page: its address's buckets only (the address's, and its anonymous share).
    assert len(hub.address_allowances) == len(hub.anonymous_allowances) == 1
    assert not hub.allowances
    assert len(pending) == 1, f"{len(pending)} timers for one client"
    await eventually(
        lambda: _true(not hub.address_allowances and not hub.anonymous_allowances),
        what="the full buckets to be forgotten",
    )
    assert not pending


async def test_rounds_of_positions_that_give_way_often_still_reach_the_back_of_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round of positions that gave way to news is done again from the first page, and
    news comes often in a sale (admissions every step): a round stopped by news about as
    far in as the last one never reached the pages behind (news every second slice: the
    first 64 pages of 256 told, round after round). A round gives way only past the page
    where the last one stopped, so each gets further, and every page is told once."""
    monkeypatch.setattr(live, "SLICE_SECONDS", 0.0)  # a slice every SLICE_CHECK_EVERY pages
    count = 4 * live.SLICE_CHECK_EVERY
    room, hub, tickets, sockets = await _line_of_pages(count)

    room.places.remove(10)  # the head is admitted: everyone moves up one
    done = False
    for _ in range(count // live.SLICE_CHECK_EVERY):
        asked: list[bool] = []

        def news_every_second_slice(asked: list[bool] = asked) -> bool:
            asked.append(True)
            return len(asked) % 2 == 0

        if done := await hub._tell_positions(give_way=news_every_second_slice):
            break
    assert done, "no round reached the back of the line"
    await eventually(
        lambda: _true(all(len(positions(s)) == 2 for s in sockets)),
        what="every page told its new place",
    )
    for socket, ticket in zip(sockets, tickets, strict=True):
        assert positions(socket) == [ticket.place - 98, ticket.place - 99]  # each told once


async def test_a_page_learns_its_estimate_is_gone_when_the_passes_out_come_to_cover_the_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No estimate while the passes out cover every unit available. Over /ws the estimate
    and the message are `AMBIENT`: a page is told them only with news of its own (its
    place moved). When the passes came to cover the units without anyone moving (the
    operator reduced the stock, lowered admitFactor or raised maxPerShopper), the page
    kept "about 1 s" while GET .../queue said there was no estimate."""
    monkeypatch.setattr(live, "LINE_SECONDS", 0.1)
    catalog = Catalog()
    product = product_in_memory(id=5, available_stock=3, total_stock=3, version=1)
    catalog.apply(product)
    now = int(time.time() * 1000)
    line = Lineup(
        5, now, (10,), admitted=1, recent_admissions=10, first_recent_admission=now - 5_000
    )
    room = Room(5, [10], [Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)])

    async def fixed_line(product_id: int, *, max_age: float = 1.0) -> Lineup:
        return dataclasses.replace(line, at=int(time.time() * 1000))

    room.line = fixed_line  # type: ignore[method-assign]
    _hub, pages, _ = await pages_counting_reads(catalog, room, ["anon:a"])
    page = pages["anon:a"]
    await eventually(lambda: _true(estimates(page)[-1:] == [1]), what="an estimate told")
    # The operator takes two units away: one unit, one pass out, nobody moves.
    catalog.apply(dataclasses.replace(product, available_stock=1, total_stock=1, version=2))
    smaller = catalog.get(5)
    assert smaller is not None
    truth = ticket_view(room.tickets["anon:a"], smaller, await fixed_line(5), now=now)
    assert truth["estimatedWaitSeconds"] is None  # what GET .../queue says now
    await eventually(
        lambda: _true(estimates(page)[-1:] == [None]),
        what="the page told there is no estimate now",
        within=3,
    )


def estimates(socket: Any) -> list[int | None]:
    frames = [json.loads(t) for t in socket.sent if '"type":"ticket"' in t]
    return [f["ticket"]["estimatedWaitSeconds"] for f in frames]


async def test_a_socket_is_counted_as_the_client_and_address_it_was_given() -> None:
    """`live_updates` works out a socket's client and address once, before the caps are
    checked, and the hub counts the socket as those: its `Client` worked the address out
    from the socket's scope again (three times for every socket opened)."""
    hub = Hub(Catalog(), max_clients=10, max_per_client=1, max_per_address=2)
    socket = Socket()
    socket.scope["client"] = ("203.0.113.7", 50_000)
    client = hub.join(socket, "shop:alice", address="addr:198.51.100.1")  # type: ignore[arg-type]
    assert (client.key, client.address) == ("shop:alice", "addr:198.51.100.1")
    hub.join(Socket(), "shop:bob", address="addr:198.51.100.1")  # type: ignore[arg-type]
    assert hub.full_for("shop:carol", "addr:198.51.100.1") == "your address"
    assert hub.full_for("shop:carol", "addr:203.0.113.7") is None


BAD_ROOM_NEWS: list[dict[str, Any]] = [
    {"step": "9", "waiting": 1, "admitted": 0},  # a step that is no number
    {"step": 9, "waiting": "x", "admitted": 0},  # its step fine, its counts not
    {"step": 9, "waiting": 1, "admitted": None},  # one count of two
    {"step": True, "waiting": 1, "admitted": 0},
    {"step": -1, "waiting": 1, "admitted": 0},
    {"step": 2**63, "waiting": 1, "admitted": 0},
    {"step": 9, "waiting": 1, "admitted": 0, "productId": "5"},
    {"step": 9, "waiting": 1, "admitted": 0, "shoppers": "anon:a"},
    {"step": 9, "waiting": 1, "admitted": 0, "everyone": "yes"},
    {"step": 9, "waiting": 1, "admitted": 0, "closed": ["anon:a"], "closedAt": "soon"},
    {"step": 9, "waiting": 1, "admitted": 0, "passed": ["anon:a"], "passedAt": 40},
    {"step": 9, "waiting": 1, "admitted": 0, "joined": [7]},
    {"step": 9, "waiting": 1, "admitted": 0, "joined": ["x" * 300]},
]


async def test_bad_room_news_changes_nothing_and_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room news from Redis is checked whole before anything is made of it: a step that is
    not a number, or a sound step with counts that are not, set the room's newest step
    (`_steps`) before the counts failed, and every later step's news up to it was dropped
    as old (its counts never reached a page). Each bad message raised out of the hub,
    logged with its traceback every time."""
    monkeypatch.setattr(live, "QUEUE_FRAME_SECONDS", 0.05)
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=3))
    room = Room(5, [10], [Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)])
    hub, pages, reads = await pages_counting_reads(catalog, room, ["anon:a"])
    page = pages["anon:a"]
    hub.publish(*_echo(RoomChanged(5, 10, 2, step=5)))
    await eventually(lambda: _true(queue_counts(page) == [10]), what="step 5's counts")
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    subscriber = Subscriber(redis, None, catalog)  # type: ignore[arg-type]
    subscriber.listen(hub.publish)  # checked there, once: the hub tells what it is given
    with caplog.at_level(logging.WARNING, logger="server.live.subscriber"):
        for _ in range(3):
            for bad in BAD_ROOM_NEWS:
                subscriber._dispatch(to_json({"type": "room", "productId": 5, **bad}))
    warnings = [r for r in caplog.records if r.name == "server.live.subscriber"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one a minute
    assert "malformed message" in warnings[0].getMessage()
    # Nothing of them kept: the room's newest step, its counts, tickets to read or tell.
    assert hub._steps == {5: 5}
    assert hub._queue_counts == {5: (10, 2)}
    assert (hub._rooms, hub._closing, hub._passing, reads) == ({}, {}, {}, [])
    # Step 8's news is newer than any sound one told: it is told.
    hub.publish(*_echo(RoomChanged(5, 7, 1, step=8)))
    await eventually(lambda: _true(queue_counts(page) == [10, 7]), what="step 8's counts")


def test_bad_room_news_from_redis_reaches_no_listener_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The subscription checks a room message before any listener sees it: the hub, and the
    admitter's nudge (`server.api.app._nudge_rooms`, which read its `productId`), take only
    sound news, and a peer sending bad news again and again writes one line a minute."""
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    subscriber = Subscriber(redis, None, Catalog())  # type: ignore[arg-type]
    heard: list[dict[str, Any]] = []
    subscriber.listen(lambda frame, raw, news: heard.append(frame))
    with caplog.at_level(logging.WARNING, logger="server.live.subscriber"):
        for bad in BAD_ROOM_NEWS * 3:
            subscriber._dispatch(to_json({"type": "room", "productId": 5, **bad}))
    assert heard == []
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    good = room_message(RoomChanged(5, 3, 1, joined=frozenset({"anon:a"}), step=2))
    subscriber._dispatch(to_json(good))
    assert heard == [json.loads(to_json(good))]


# Stock messages a faulty peer may publish whose numbers are JSON that parses (the parser
# takes `1e400`, `Infinity` and `NaN`) but are no integers: `int()` of an infinity raises
# OverflowError, not ValueError.
BAD_STOCK_NEWS: list[bytes] = [
    b'{"type":"stock","productId":1,"availableStock":1e400,"version":1}',
    b'{"type":"stock","productId":Infinity,"availableStock":1,"version":1}',
    b'{"type":"stock","productId":1,"availableStock":1,"version":1,"heldStock":-Infinity}',
    b'{"type":"stock","productId":1,"availableStock":NaN,"version":1}',
]


def test_a_stock_message_with_an_infinite_number_is_dropped_like_any_malformed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stock message whose count is an infinity raised OverflowError out of the
    subscription's dispatch, which `_run` took for a failed subscriber: it logged the
    traceback (every time, however often it came), dropped the Redis subscription, slept,
    subscribed again and reloaded the catalog from the database, and every message
    published in between (stock, reservations, room news) was lost to this process. It is
    malformed like any other: dropped, reaching no listener, logged at most once a minute."""
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    catalog = Catalog()
    catalog.apply(product_in_memory(id=1, available_stock=3))
    subscriber = Subscriber(redis, None, catalog)  # type: ignore[arg-type]
    heard: list[dict[str, Any]] = []
    subscriber.listen(lambda frame, raw, news: heard.append(frame))
    with caplog.at_level(logging.WARNING, logger="server.live.subscriber"):
        for bad in BAD_STOCK_NEWS * 3:
            subscriber._dispatch(bad)
    assert heard == []
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert "malformed" in caplog.records[0].getMessage()
    product = catalog.get(1)
    assert product is not None
    assert product.available_stock == 3


async def test_only_news_a_process_told_itself_is_awaited_back_as_its_echo() -> None:
    """A hub awaits the echo from Redis of the steps its own admitter told it (`room_news`)
    and of nothing else: it made an empty set of echoes for every room whose news it merely
    got from another process."""
    hub = Hub(catalog_of(*range(1, 101)), max_clients=10, room=Room(1, [], []))  # type: ignore[arg-type]
    for product_id in range(1, 101):
        hub.publish(*_echo(RoomChanged(product_id, 1, 0, step=1)))
    assert hub._echoes == {}
    hub.room_news([RoomChanged(7, 1, 0, step=2)])
    assert hub._echoes == {7: {2}}
    hub.publish(*_echo(RoomChanged(7, 1, 0, step=2)))  # its echo: awaited no more
    assert hub._echoes == {}


async def test_news_of_rooms_of_products_not_in_the_catalog_is_dropped_and_kept_nowhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hub kept news of any product id a message named (its step, counts, `queue` frame
    and text, tickets to read): a faulty peer publishing news of ids without end grew its
    dicts without end. News of a product the catalog does not have is dropped, logged at
    most once a window; news of one it has is told as before."""
    room = Room(5, [10], [Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)])
    hub = Hub(catalog_of(5), max_clients=10, room=room)  # type: ignore[arg-type]
    socket = Socket()
    hub.join(socket)  # type: ignore[arg-type]
    for product_id in range(1_000, 3_000):
        everyone = RoomChanged(product_id, 3, 1, everyone=True, step=1)
        hub.publish(*_echo(everyone))
        hub.room_news([RoomChanged(product_id, 3, 1, step=2)])
    kept = (hub._steps, hub._echoes, hub._queue_counts, hub._queue_texts, hub._rooms)
    assert [dict(d) for d in kept] == [{}, {}, {}, {}, {}]
    assert hub._queues == {}
    assert hub._moved_rooms == set()
    assert len([r for r in caplog.records if "does not know" in r.getMessage()]) == 1
    hub.publish(*_echo(RoomChanged(5, 3, 1, step=1)))
    await eventually(lambda: _true(queue_counts(socket) == [3]), what="the known room's counts")
    assert list(hub._steps) == [5]


async def test_a_rooms_steps_counted_again_from_far_below_are_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database restored from a backup takes a room's step numbers back by every step
    since the backup (18,000 an hour while anyone waits): every hub dropped the room's news
    as old until its steps passed the old number again, and the pages' counts stood still.
    A step more than STEP_RESET below the newest told is the count started again; news a
    few steps late is still old news."""
    monkeypatch.setattr(live, "QUEUE_FRAME_SECONDS", 0.05)
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=3))
    room = Room(5, [10], [Ticket(5, "anon:a", 10, TicketState.WAITING, joined_at=2)])
    hub, pages, _ = await pages_counting_reads(catalog, room, ["anon:a"])
    page = pages["anon:a"]
    hub.room_news([RoomChanged(5, 10, 2, step=20_000)])
    await eventually(lambda: _true(queue_counts(page) == [10]), what="10")
    hub.publish(*_echo(RoomChanged(5, 9, 2, step=20_000 - 5)))  # late: old news
    hub.publish(*_echo(RoomChanged(5, 4, 1, step=12)))  # after the restore
    await eventually(lambda: _true(queue_counts(page) == [10, 4]), what="the restored count")
    hub.publish(*_echo(RoomChanged(5, 3, 1, step=13)))  # and on from there
    await eventually(lambda: _true(queue_counts(page) == [10, 4, 3]), what="step 13's")
    assert hub._echoes == {}  # the echo of step 20,000 is awaited no more


async def test_a_socket_whose_shop_token_expired_counts_as_its_address() -> None:
    """At its token's expiry a socket opened with the shop's token is its address's, for
    the caps (`full_for`) and for its messages (the address's anonymous share): it kept
    the shopper's key, and a place and messages of theirs, for as long as it stayed open."""
    hub = Hub(Catalog(), max_clients=10, max_per_client=2, max_per_address=4)
    socket = Socket()
    client = hub.join(socket, "shop:alice", address="addr:198.51.100.1")  # type: ignore[arg-type]
    client.signed_in_until = time.time() + 0.05
    await hub.identify(client, "shop:alice")
    assert hub.full_for("addr:198.51.100.1") is None
    hub.join(Socket(), address="addr:198.51.100.1")  # type: ignore[arg-type]
    await eventually(lambda: _true(client.key == "addr:198.51.100.1"), what="the expiry")
    assert hub.full_for("addr:198.51.100.1") == "your address"  # its two: both anonymous
    assert hub.full_for("shop:alice") is None
    assert hub.refusal(client) is None
    assert hub.anonymous_allowances.left("addr:198.51.100.1") < hub.anonymous_allowances.capacity
    assert not hub.allowances  # nothing of Alice's spent
    assert not client.closed


# Stock messages whose fields are not what `stock_frame` sends: `int()` took each of them.
COERCED_STOCK_NEWS: list[bytes] = [
    b'{"type":"stock","productId":1,"availableStock":"0","version":90}',  # a string
    b'{"type":"stock","productId":1,"availableStock":0,"version":90,"heldStock":true}',
    b'{"type":"stock","productId":1.9,"availableStock":0,"version":90}',  # not an id
    b'{"type":"stock","productId":1,"availableStock":-7,"version":90}',  # no count
]


def test_a_stock_message_of_no_integers_changes_nothing() -> None:
    """A stock message was read with `int()` (the attacker's review, 12-01): a string, a
    boolean, a fraction or a negative count from a faulty peer became the product's stock
    in the catalog (and reached the pages as it was sent), where room news is checked
    whole (`room_from_message`). Now each field is checked (`stock_from_frame`)."""
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    for bad in COERCED_STOCK_NEWS:
        catalog = Catalog()
        catalog.apply(product_in_memory(id=1, available_stock=3))
        subscriber = Subscriber(redis, None, catalog)  # type: ignore[arg-type]
        heard: list[dict[str, Any]] = []

        def hear(
            frame: dict[str, Any],
            raw: bytes,
            news: RoomChanged | None,
            heard: list[dict[str, Any]] = heard,
        ) -> None:
            heard.append(frame)

        subscriber.listen(hear)
        subscriber._dispatch(bad)
        product = catalog.get(1)
        assert product is not None
        assert (product.available_stock, heard) == (3, []), bad


async def test_a_stock_message_of_a_version_far_ahead_is_undone_by_the_next_reload(
    store: Store,
) -> None:
    """The attacker's review (12-01): one stock message with a version far ahead of the
    product's (2**62, from a faulty peer, or a database restored from a backup under a
    running process) was kept as the newest, and every later change of the product, the
    5 s reload from the database included, was older and ignored until the process
    restarted. The database is the truth: a version there more than VERSION_RESET below
    the catalog's is taken as it is."""
    made = await make_product(store, 3)
    catalog = Catalog()
    await catalog.reload(store)
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    subscriber = Subscriber(redis, None, catalog)  # type: ignore[arg-type]
    far = 2**62
    subscriber._dispatch(
        b'{"type":"stock","productId":%d,"availableStock":0,"version":%d}' % (made.id, far)
    )
    taken = catalog.get(made.id)
    assert taken is not None
    assert (taken.available_stock, taken.version) == (0, far)
    assert [p.id for p in await catalog.reload(store)] == [made.id]
    now = catalog.get(made.id)
    assert now is not None
    assert (now.available_stock, now.version) == (3, made.version)
    # An ordinary newer change applies again.
    assert catalog.apply(dataclasses.replace(now, available_stock=2, version=now.version + 1))


async def _rename(store: Store, product_id: int, name: str) -> None:
    """The product's row changed in the database (a new name, its version up one) with no
    frame published: what the periodic reload is there to catch."""

    async def write(conn: Any) -> None:
        await conn.execute(
            "UPDATE products SET name = :name, version = version + 1 WHERE id = :id",
            {"name": name, "id": product_id},
        )

    await store.write(write)


async def test_the_periodic_reload_reads_whole_only_the_products_that_differ(
    store: Store,
) -> None:
    """The periodic reload (`whole=False`) reads every version and whole only the rows that
    differ, or that the catalog has only patched from a stock frame: a row changed with no
    frame is caught, and so is one whose stock frame came at the row's own version with
    the rest of the row (its new name) not in it."""
    first = await make_product(store, 3)
    second = await make_product(store, 4)
    catalog = Catalog()
    await catalog.reload(store)
    assert await catalog.reload(store, whole=False) == []
    await _rename(store, first.id, "renamed")
    changed = await catalog.reload(store, whole=False)
    assert [(p.id, p.name) for p in changed] == [(first.id, "renamed")]
    # A stock frame at the version the database has already: the catalog has the version
    # but not the row's new name; the next periodic reload reads it whole.
    await _rename(store, second.id, "also renamed")
    assert catalog.apply_stock(second.id, 4, second.version + 1)
    patched = catalog.get(second.id)
    assert patched is not None
    assert (patched.name, patched.version) == (second.name, second.version + 1)
    changed = await catalog.reload(store, whole=False)
    assert [(p.id, p.name) for p in changed] == [(second.id, "also renamed")]
    # Read whole and the same: not read again.
    assert await catalog.reload(store, whole=False) == []


async def test_the_periodic_reload_passes_on_only_the_stock_that_moved(store: Store) -> None:
    """After a subscribe every product's stock goes to the listeners; the periodic reload
    gives only the products whose version moved since (the hub has the others' already),
    and a product frame for a row the catalog had not seen."""
    made = [await make_product(store, 2) for _ in range(3)]
    catalog = Catalog()
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    subscriber = Subscriber(redis, store, catalog)  # type: ignore[arg-type]
    heard: list[tuple[str, int]] = []

    def hear(frame: dict[str, Any], raw: bytes, news: object) -> None:
        product_id = frame["productId"] if frame["type"] == "stock" else frame["product"]["id"]
        heard.append((frame["type"], product_id))

    subscriber.listen(hear)
    await subscriber._resync()
    assert sorted(t for t in heard if t[0] == "stock") == [("stock", p.id) for p in made]
    heard.clear()
    await subscriber._resync(whole=False)
    assert heard == []
    await _rename(store, made[1].id, "renamed")
    await subscriber._resync(whole=False)
    assert heard == [("product", made[1].id), ("stock", made[1].id)]
    heard.clear()
    await subscriber._resync()  # a subscribe again: everything
    assert sorted(t for t in heard if t[0] == "stock") == [("stock", p.id) for p in made]


async def test_a_row_at_the_catalogs_version_with_other_content_is_taken_within_a_minute(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fell back a version (a replica that lost the last commit, a restore)
    and a new commit brought it to the catalog's version with other content: the periodic
    reload by versions reads it never (its version is the catalog's), so every
    RELOAD_WHOLE_EVERY-th reads every row whole and takes it (the attacker's review)."""
    monkeypatch.setattr(subscriber_module, "RELOAD_SECONDS", 0.01)
    monkeypatch.setattr(subscriber_module, "RELOAD_WHOLE_EVERY", 3)
    made = await make_product(store, 5)
    catalog = Catalog()
    await catalog.reload(store)
    before = catalog.get(made.id)
    assert before is not None
    # A commit this process saw, which the database then lost.
    assert catalog.apply(dataclasses.replace(before, available_stock=4, version=before.version + 1))

    async def write(conn: Any) -> None:  # another commit, to the same version
        await conn.execute(
            "UPDATE products SET available_stock = 2, held_units = 3, version = version + 1 "
            "WHERE id = :id",
            {"id": made.id},
        )

    await store.write(write)
    assert await catalog.reload(store, whole=False) == []  # by versions: not seen
    redis = types.SimpleNamespace(connection_pool=types.SimpleNamespace(connection_kwargs={}))
    subscriber = Subscriber(redis, store, catalog)  # type: ignore[arg-type]
    reloading = asyncio.create_task(subscriber._reload_forever())
    try:
        await eventually(
            lambda: _true(getattr(catalog.get(made.id), "available_stock", None) == 2),
            what="the database's row at the catalog's version",
        )
    finally:
        reloading.cancel()
        await asyncio.gather(reloading, return_exceptions=True)


async def test_a_detached_task_is_kept_until_it_ends() -> None:
    """The hub's tasks left to finish on their own (a socket's close, a join's answer)
    are kept until they end: the event loop holds a task only weakly, and one waiting on a
    future only it holds was collected, pending, by the next garbage collection."""
    ended = asyncio.Event()
    waited: list[weakref.ref[asyncio.Future[None]]] = []

    async def work() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waited.append(weakref.ref(future))
        await future
        ended.set()

    live._detach(work())
    await asyncio.sleep(0)  # it starts, and waits
    gc.collect()
    future = waited[0]()
    assert future is not None, "the task was collected while it waited"
    future.set_result(None)
    await asyncio.wait_for(ended.wait(), 10)


def _joins_observed() -> tuple[float, float]:
    """QUEUE_JOIN_DURATION so far in this process: (count, sum of seconds)."""
    DEFERRED.flush()
    (metric,) = QUEUE_JOIN_DURATION.collect()
    samples = {s.name: s.value for s in metric.samples}
    return samples["flashsale_queue_join_duration_seconds_count"], samples[
        "flashsale_queue_join_duration_seconds_sum"
    ]


async def test_a_join_over_a_socket_is_timed_from_its_read_to_its_answer(store: Store) -> None:
    """The web's own part of a join's latency (`flashsale_queue_join_duration_seconds`):
    from the message read off its socket to its answer handed to the socket, the wait for
    its batch's transaction included; one observation per join answered, a refused one
    too. The waiting room's bench reads it beside the time its shoppers see, to tell the
    server's part from the kernel's and the load generator's."""
    product, catalog, room = await _fifo_room(store)
    try:
        hub = Hub(catalog, max_clients=10, room=room)
        socket = Socket()
        client = hub.join(socket)  # type: ignore[arg-type]
        await hub.identify(client, "anon:me")
        client.handling = False  # its task waits for a message, as `live_updates`'s does
        count, total = _joins_observed()
        async with writer_held(store) as let_go:
            began = time.monotonic()
            assert hub.take_join(client, f'{{"type":"join","productId":{product.id}}}')
            await asyncio.sleep(0.05)  # the batch waits for the writer this long at least
            held = time.monotonic() - began
            assert not any('"type":"ticket"' in text for text in socket.sent)
            await let_go()
        await eventually(
            lambda: _true(any('"type":"ticket"' in text for text in socket.sent)),
            what="the join's answer",
        )
        after, after_total = _joins_observed()
        assert after == count + 1
        assert after_total - total >= held
    finally:
        await room.stop()
    # A join refused (the process's joins have stopped) is answered, and timed, too.
    client.answering = None
    assert hub.take_join(client, f'{{"type":"join","productId":{product.id}}}')
    assert _joins_observed()[0] == count + 2
    # And one refused for the socket's rate (its error frame is its answer), as the
    # socket's task times the same refusal.
    client.answering = None
    while client.may_send():
        pass
    assert hub.take_join(client, f'{{"type":"join","productId":{product.id}}}')
    assert any('"rate_limited"' in text for text in socket.sent)
    assert _joins_observed()[0] == count + 3


def paced(hub: Hub) -> bool:
    """Whether a flush of counts alone is under way, paced (a function: mypy narrows an
    attribute read twice as if it could not change in between)."""
    return hub._paced


async def test_a_flush_of_counts_alone_is_paced_and_ends_its_pacing_for_other_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flush of a line's counts alone (nothing a page must hear soon) goes in slices with
    the loop left alone between them for three times as long as each took
    (COUNTS_FLUSH_SHARE): back to back, one to 15,000 pages held the joins of the minute
    before a sale 60-110 ms every ~8 s. A stock frame due meanwhile ends the pacing: the
    rest of the counts go at once, then the stock, to every page in that order."""
    monkeypatch.setattr(live, "COUNTS_SLICE_SECONDS", 0.0)  # a page a slice
    monkeypatch.setattr(live, "SLICE_CHECK_EVERY", 4)
    monkeypatch.setattr(live, "FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(live, "FANOUT_BURST", 10.0)
    hub = Hub(catalog_of(5), max_clients=20)
    pages = joined_pages(hub, [CostlyPage(0.01) for _ in range(6)])
    hub.publish(*_room({"type": "room", "productId": 5, "waiting": 1, "admitted": 0}))
    await eventually(lambda: _true(all(len(p.writes) == 1 for p in pages)), what="the counts")
    at = sorted(p.at[0] for p in pages)
    # Each write took >= 10 ms, so each pause >= 30 ms (a busy machine only makes it later;
    # a timer may fire up to the clock's resolution early).
    assert all(b - a >= 0.04 - 0.005 for a, b in itertools.pairwise(at)), at
    assert not paced(hub)

    # Paced so slowly now that the rest would take minutes: a stock change ends it.
    monkeypatch.setattr(live, "COUNTS_FLUSH_SHARE", 0.0001)
    hub.publish(*_room({"type": "room", "productId": 5, "waiting": 2, "admitted": 0}))
    await eventually(lambda: _true(any(len(p.writes) == 2 for p in pages)), what="a slice")
    assert paced(hub)
    hub.publish(*stock(5, 9, 1))
    hub.flush()
    await eventually(
        lambda: _true(all(len(p.writes) == 3 for p in pages)), what="the rest, then the stock"
    )
    for page in pages:
        assert '"waiting":2' in page.writes[1].decode(errors="replace")
        assert '"type":"stock"' in page.writes[2].decode(errors="replace")


async def test_positions_wait_while_joins_stream_in_and_a_round_begun_gives_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storm of joins (JOINS_BUSY_PER_SECOND or more) marks the loop busy before its
    timers run late: a sale's start shows a random room's drawn order, a round of positions
    to every page that waited, which went out right as its first second's joins came. A
    round begun as the storm began gives way once it is found, and is deferred from then as
    any other, up to POSITIONS_MAX_DEFER_SECONDS; once the joins stop, the rest is told, each
    page once."""
    monkeypatch.setattr(live, "LINE_SECONDS", 0.05)
    monkeypatch.setattr(live, "POSITIONS_MAX_DEFER_SECONDS", 2.0)
    monkeypatch.setattr(live, "BUSY_HOLD_SECONDS", 0.3)
    monkeypatch.setattr(live, "JOINS_BUSY_PER_SECOND", 100)
    monkeypatch.setattr(live, "SLICE_SECONDS", 0.0)  # a slice every SLICE_CHECK_EVERY pages
    room, hub, tickets, sockets = await _line_of_pages(3 * live.SLICE_CHECK_EVERY)
    loop = asyncio.get_running_loop()
    joining = True

    async def storm() -> None:  # 1,000 joins a second, without the loop being behind
        while joining:
            for _ in range(10):
                hub.count_join()
            await asyncio.sleep(0.01)

    # The storm begins as the first page of a round is told (the round's first slice).
    first = sockets[0]
    send = first.send_text
    storming: list[asyncio.Task[None]] = []

    async def begins_the_storm(text: str) -> None:
        if not storming:
            storming.append(asyncio.create_task(storm()))
            hub._busy_until = loop.time() + live.BUSY_HOLD_SECONDS  # its first probe
        await send(text)

    first.send_text = begins_the_storm  # type: ignore[method-assign]
    hub._start_ticketer()
    room.places.remove(10)  # the head is admitted: everyone moves up one
    await eventually(lambda: _true(bool(storming)), what="a round to begin")
    began = loop.time()
    try:
        await eventually(
            lambda: _true(all(len(positions(s)) == 2 for s in sockets)),
            what="the deferred positions",
        )
        # The round gave way after its first slice, and the rest waited for the deferral
        # (2 s from the round before, due LINE_SECONDS and a few loop turns before `began`).
        assert loop.time() - began >= 1.5
    finally:
        joining = False
        await asyncio.gather(*storming)
    for socket, ticket in zip(sockets, tickets, strict=True):
        assert positions(socket) == [ticket.place - 98, ticket.place - 99]  # each told once
    await eventually(lambda: _true(not hub.loop_busy), what="the joins over")
    room.places.remove(100)
    await eventually(
        lambda: _true(all(len(positions(s)) == 3 for s in sockets[1:])), what="the next, at once"
    )


async def test_a_step_that_moved_nobody_leaves_the_line_as_read() -> None:
    """Positions are read again soon (MOVED_SECONDS) after news that moved someone in line:
    named (left, lapsed), admitted, closed, or a step whose count of passes out is not the
    line's as read. A step that only counted the joins since the last (a sale's first
    second: one every 20 ms) moves nobody: with each read as if it did, the line (15,000
    places) was read every 0.2 s, and the joins answered meanwhile waited for each read."""
    from server.api.app import _nudge_rooms

    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, queue="fifo"))
    moved: list[int] = []
    line = Lineup(product_id=5, at=1, places=(1, 2, 3), admitted=4)
    room = types.SimpleNamespace(
        counts_changed=lambda product_id: None,
        moved=moved.append,
        cached_line=lambda product_id: line,
    )
    admitter = types.SimpleNamespace(nudge=lambda product_id: None)

    def news(**fields: Any) -> None:
        frame = {"type": "room", "productId": 5, **fields}
        _nudge_rooms(catalog, admitter, room, frame, b"", room_from_message(frame))  # type: ignore[arg-type]

    news(waiting=900, admitted=4, step=7)  # the joins counted: nobody moved
    assert moved == []
    news(waiting=899, admitted=5, step=8)  # a pass more than the line says
    news(waiting=899, admitted=4, step=9, passed=["anon:a"], passedAt=5, passUntil=9)
    news(waiting=0, admitted=4, step=10, closed=["anon:b"], closedAt=6)
    news(shoppers=["anon:c"])  # a leave: named, not counted
    assert moved == [5, 5, 5, 5]


class SlowLineRoom(Room):
    """`Room` whose line is read only once `readable` is set (a busy database's read)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.readable = asyncio.Event()

    async def line(self, product_id: int, *, max_age: float = 1.0) -> Lineup:
        await self.readable.wait()
        return await super().line(product_id, max_age=max_age)


async def test_a_ticket_frame_s_server_time_is_taken_once_its_line_was_read() -> None:
    """A join's answer that waits for its line to be read says when it was made, after the
    read (its `serverTime`: a page's countdown and the waiting room's bench go by it), not
    when the answer began: under load it said up to 0.3 s too early."""
    catalog = Catalog()
    catalog.apply(product_in_memory(id=5, available_stock=0))
    mine = Ticket(5, "anon:me", 20, TicketState.WAITING, joined_at=2)
    room = SlowLineRoom(5, [10, 20], [mine])
    hub = Hub(catalog, max_clients=10, room=room)  # type: ignore[arg-type]
    socket = Socket()
    client = hub.join(socket)  # type: ignore[arg-type]
    answering = asyncio.create_task(hub.joined(client, mine))
    await asyncio.sleep(0.01)  # the read takes 10 ms
    read_at = now_ms()
    room.readable.set()
    await answering
    (frame,) = [json.loads(text) for text in socket.sent if '"type":"ticket"' in text]
    assert parse_iso(frame["ticket"]["serverTime"]) >= read_at
