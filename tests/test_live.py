"""Live updates over /ws through real uvicorn processes, a real Redis and a real worker.

Two web services (one process each) share the database and Redis, so that "a change made
through the other process" is certain. Tests wait for frames with a deadline, never sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from pydantic_core import from_json, to_json
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import Service
from server.infra.keys import events_channel
from server.live.hub import MAX_BAD_MESSAGES, MESSAGE_BURST, MESSAGE_REFILL_S
from tests.events import Frame, FrameLog
from tests.support import eventually

pytestmark = pytest.mark.slow
JWT_SECRET = "the-shop-signs-its-shoppers-with-this-32-byte-key"


@contextmanager
def one_service(
    database_url: str, redis_url: str, logs: Path, **settings: str
) -> Iterator[Service]:
    """One web process, for what a socket to one process shows (`two_services` where
    frames cross processes, or the worker's expiries reach the pages): a second service
    started and unused was a web process's start and stop in every such test. No worker:
    a web process publishes its own changes (server/live/publisher.py), and none of these
    tests has a hold expire, a webhook sent or a room admitted; the worker's start and its
    stop were 1-4 s of each of them on a busy machine, for nothing they checked."""
    service = Service(database_url, redis_url, logs / "a", web_concurrency=1, **settings)
    try:
        service.start(worker=False)
        yield service
    finally:
        service.stop()


@contextmanager
def two_services(
    database_url: str, redis_url: str, logs: Path, *, worker: bool = True, **settings: str
) -> Iterator[tuple[Service, Service]]:
    """Two web services on one database and Redis, and one worker, started together (one
    after the other, a test waited for both starts: each is mostly the imports' CPU, and
    the machine has two cores). `worker=False`: no worker, for frames that cross processes
    where no hold expires (a web process publishes its own changes; the worker's start and
    stop were 1-4 s of such a test on a busy machine)."""
    first = Service(database_url, redis_url, logs / "a", web_concurrency=1, **settings)
    second = Service(database_url, redis_url, logs / "b", web_concurrency=1, **settings)
    try:
        with ThreadPoolExecutor(2) as starting:
            started = [
                starting.submit(first.start, worker=worker),
                starting.submit(second.start, worker=False),
            ]
        for start in started:
            start.result()
        yield first, second
    finally:
        second.stop()
        first.stop()


class Socket:
    """A /ws client that collects every frame it receives."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames = FrameLog()
        self.closed: ConnectionClosed | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.connection:
                await self.frames.add(from_json(message))
        except ConnectionClosed as closed:
            self.closed = closed

    @property
    def reader(self) -> asyncio.Task[None]:
        """Done once the socket has closed and every frame it got is in `frames`."""
        return self._reader

    async def send(self, message: object) -> None:
        await self.connection.send(
            message if isinstance(message, str) else to_json(message).decode()
        )

    async def stock(self, product_id: int, available: int, within: float = 10) -> Frame:
        (frame,) = await self.frames.wait_for(
            lambda f: (
                f["type"] == "stock"
                and f["productId"] == product_id
                and f["availableStock"] == available
            ),
            within=within,
        )
        return frame

    async def status(self, reservation_id: str, status: str, within: float = 10) -> Frame:
        (frame,) = await self.frames.wait_for(
            lambda f: (
                f["type"] == "reservation"
                and f["reservation"]["id"] == reservation_id
                and f["reservation"]["status"] == status
            ),
            within=within,
        )
        return frame

    async def close(self) -> None:
        await self.connection.close()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def socket_to(service: Service, path: str = "/ws", **kwargs: Any) -> AsyncIterator[Socket]:
    url = service.base_url.replace("http://", "ws://") + path
    async with connect(url, open_timeout=10, **kwargs) as connection:
        client = Socket(connection)
        try:
            yield client
        finally:
            await client.close()


async def reserve(service: Service, product_id: int, quantity: int = 1) -> dict[str, Any]:
    async with service.client() as client:
        response = await client.post(
            "/api/reservations", json={"productId": product_id, "quantity": quantity}
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_socket_opens_with_a_snapshot(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path) as a:
        product = await a.new_product(7)
        async with socket_to(a) as ws:
            (snapshot,) = await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
        assert snapshot["serverTime"].endswith("Z")
        assert any(
            p["id"] == product["id"] and p["availableStock"] == 7 for p in snapshot["products"]
        )


async def test_a_page_that_names_its_products_gets_only_those(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """`/ws?ids=…`: the snapshot and the frames of those products only (with 10,000
    products the whole snapshot is 1.35 MB)."""
    with two_services(database_url, redis_url, tmp_path, worker=False, HOLD_SECONDS="120") as (
        a,
        b,
    ):
        shown, other = await a.new_product(10), await a.new_product(10)
        async with socket_to(a, f"/ws?ids={shown['id']},999999") as ws:
            (snapshot,) = await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            assert [p["id"] for p in snapshot["products"]] == [shown["id"]]
            # Changed through the other process, the product not shown first: its frame
            # reaches this process before the shown product's does, and is not passed on.
            await reserve(b, other["id"], 2)
            await reserve(b, shown["id"], 3)
            await ws.stock(shown["id"], 7)
            about_other = [
                f
                for f in ws.frames.frames
                if other["id"] in (f.get("productId"), f.get("product", {}).get("id"))
            ]
            assert about_other == []


# Bad `ids` and what the refusal must name. One service for all of them, a socket each: as
# a test each, the service's start and stop were most of each one's time.
BAD_IDS = [
    ("abc", '"abc" was sent'),
    ("", '"" was sent'),
    ("0", '"0" was sent'),
    (",".join(map(str, range(1, 102))), '"1,2,3,'),
    ("1%002", '"1\\x002" was sent'),
    ("3,8&ids=9", "ids: was sent 2 times; send it once"),
]


async def test_a_socket_with_bad_ids_is_told_why_and_closed(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path) as a:
        for ids, named in BAD_IDS:
            async with socket_to(a, f"/ws?ids={ids}") as ws:
                (error,) = await ws.frames.wait_for(_error("invalid_ids"))
                assert named in error["message"], (ids[:20], error)
                await ws.connection.wait_closed()
                assert ws.connection.close_code == 1008, ids[:20]
                assert all(f["type"] != "snapshot" for f in ws.frames.frames), ids[:20]


async def test_a_change_through_one_process_reaches_clients_of_both(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with two_services(database_url, redis_url, tmp_path, worker=False, HOLD_SECONDS="120") as (
        a,
        b,
    ):
        product = await a.new_product(10)
        async with socket_to(a) as on_a, socket_to(b) as on_b:
            await on_b.frames.wait_for(lambda f: f["type"] == "snapshot")
            held = await reserve(a, product["id"], 3)
            seen_on_b = await on_b.stock(product["id"], 7)
            seen_on_a = await on_a.stock(product["id"], 7)
        assert seen_on_b["version"] > product["version"]
        assert seen_on_b["version"] == seen_on_a["version"] == held["product"]["version"]
        # Held units travel with the stock: a page can tell "all reserved" from "sold out".
        assert seen_on_b["heldStock"] == seen_on_a["heldStock"] == 3


async def test_an_expiry_by_the_worker_reaches_clients_of_both(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with two_services(database_url, redis_url, tmp_path, HOLD_SECONDS="0.5") as (a, b):
        product = await a.new_product(10)
        async with socket_to(a) as on_a, socket_to(b) as on_b:
            await on_a.frames.wait_for(lambda f: f["type"] == "snapshot")
            await on_b.frames.wait_for(lambda f: f["type"] == "snapshot")
            await reserve(b, product["id"], 4)
            assert (await on_a.stock(product["id"], 6))["heldStock"] == 4
            expired = await on_a.stock(product["id"], 10)  # the worker expired it
            assert expired["heldStock"] == 0
            await on_b.stock(product["id"], 10)


async def test_a_watcher_hears_its_hold_expire_complete_and_cancel(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Holds of 4 s: long enough for a loaded machine to open the socket and watch a hold, or
    # complete and cancel two, before they expire (at 1 s one failed so at a load of 7),
    # short enough to wait for the first one's expiry.
    with two_services(database_url, redis_url, tmp_path, HOLD_SECONDS="4") as (a, b):
        product = await a.new_product(10)
        to_expire = await reserve(a, product["id"])
        async with socket_to(b) as ws:
            await ws.send({"type": "watch", "reservations": [to_expire["id"]]})
            await ws.status(to_expire["id"], "ACTIVE")  # its current state, at once
            expired = await ws.status(to_expire["id"], "EXPIRED", within=30)
            assert expired["reservation"]["product"]["availableStock"] == 10

        async with a.client() as http, socket_to(b) as ws:
            to_complete = await reserve(a, product["id"])
            to_cancel = await reserve(a, product["id"])
            await ws.send({"type": "watch", "reservations": [to_complete["id"], to_cancel["id"]]})
            await ws.status(to_cancel["id"], "ACTIVE")
            await http.post(f"/api/reservations/{to_complete['id']}/complete")
            await http.post(f"/api/reservations/{to_cancel['id']}/cancel")
            await ws.status(to_complete["id"], "COMPLETED")
            cancelled = await ws.status(to_cancel["id"], "CANCELLED")
            assert cancelled["reservation"]["product"]["availableStock"] == 9


async def test_after_a_redis_restart_clients_get_what_they_missed_and_what_follows(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    with two_services(database_url, own_redis.url, tmp_path, HOLD_SECONDS="120") as (a, b):
        product = await a.new_product(10)
        async with socket_to(a) as on_a, socket_to(b) as on_b:
            await on_b.frames.wait_for(lambda f: f["type"] == "snapshot")
            own_redis.stop()
            await reserve(a, product["id"], 2)  # while Redis is down: published nowhere
            own_redis.start()
            # Resynchronised from the database once the subscription is back...
            await on_a.stock(product["id"], 8, within=20)
            await on_b.stock(product["id"], 8, within=20)
            # ...and live again.
            await reserve(b, product["id"], 1)
            await on_a.stock(product["id"], 7)
            await on_b.stock(product["id"], 7)


def _raw_websocket(service: Service) -> socket.socket:
    """A client that completes the handshake and then never reads."""
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _read_until_closed(sock: socket.socket, within: float) -> int | None:
    """Read everything the server sent; the close frame's code, or None on a bare EOF."""
    sock.settimeout(within)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    code = None
    while len(data) >= 2:  # walk the frames (server frames are unmasked)
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if opcode == 0x8 and length >= 2:
            code = struct.unpack("!H", data[offset : offset + 2])[0]
        data = data[offset + length :]
    return code


async def test_a_client_that_never_reads_delays_no_one_and_is_closed(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path, WS_PING_SECONDS="1") as a:
        product = await a.new_product(1_000)
        stuck = _raw_websocket(a)
        try:
            async with socket_to(a) as healthy:
                for n in range(1, 21):
                    await reserve(a, product["id"])
                    await healthy.stock(product["id"], 1_000 - n, within=2)
            # It answered no ping: the server gave up on it and closed it.
            code = await asyncio.to_thread(_read_until_closed, stuck, 15)
            assert code in (None, 1011)
        finally:
            stuck.close()


async def test_messages_that_are_not_understood_get_error_frames(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path) as a:
        async with socket_to(a) as ws:
            await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            for bad, code in [
                ("not json", "invalid_json"),
                ({"type": "dance"}, "unknown_message"),
                ([1, 2], "unknown_message"),
                ({"type": "watch", "reservations": "abc"}, "invalid_watch"),
                ({"type": "watch", "reservations": ["short"]}, "invalid_watch"),
                ({"type": "watch", "reservations": ["A" * 22] * 51}, "invalid_watch"),
                # Text no database could keep (issue 15): a NUL, a lone surrogate.
                ({"type": "watch", "reservations": ["\x00" * 22]}, "invalid_watch"),
                ('{"type": "watch", "reservations": ["\\ud800' + "A" * 21 + '"]}', "invalid_json"),
                ('{"type": "watch", "reservations": [], "reservations": ["x"]}', "invalid_json"),
            ]:
                await ws.send(bad)
                await ws.frames.wait_for(_error(code))
            # Each refusal names what was sent (issue 15, item 5), escaped.
            for named in ['"short" is not one', '"\\x00\\x00', "51 were sent"]:
                await ws.frames.wait_for(_error_saying(named))
            # Still connected and served:
            await ws.send({"type": "watch", "reservations": []})
            await ws.send("again not json")  # the tenth malformed message
            await ws.connection.wait_closed()
            assert ws.connection.close_code == 1008  # too many malformed messages


async def test_a_socket_past_its_messages_is_refused_then_closed(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Valid messages cost a database read or write each: a socket may send MESSAGE_BURST at
    once, then one every MESSAGE_REFILL_S; past it each is refused (`rate_limited`, not read)
    and counts towards the socket's MAX_BAD_MESSAGES. Without the bucket, a client that read
    its answers could send `watch` as fast as the event loop answered, slowing every shopper
    of the process (a reservation's p95 from 0.1 to 2 s)."""
    with one_service(database_url, redis_url, tmp_path) as a:
        async with socket_to(a) as ws:
            await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                while sent < 10 * MESSAGE_BURST:
                    await ws.send({"type": "watch", "reservations": []})
                    sent += 1
            await asyncio.wait_for(ws.connection.wait_closed(), 20)
            (refused,) = await ws.frames.wait_for(_error("rate_limited"))
            assert "was not read" in refused["message"]
            # Closed at the tenth refusal, so the burst itself was taken.
            assert sent >= MESSAGE_BURST + MAX_BAD_MESSAGES - 1
            assert ws.connection.close_code == 1008


async def _burst(ws: Socket, message: dict[str, Any]) -> list[Frame]:
    """Send `message` MESSAGE_BURST times; the `error` frames that answer them. Each is
    answered, in order (a refusal, or the message's own error frame), until the socket's
    tenth refusal closes it (1008)."""
    for _ in range(MESSAGE_BURST):
        await ws.send(message)
    answered = asyncio.ensure_future(
        ws.frames.wait_for(lambda f: f["type"] == "error", count=MESSAGE_BURST)
    )
    await asyncio.wait({answered, ws.reader}, return_when=asyncio.FIRST_COMPLETED)
    answered.cancel()
    with contextlib.suppress(asyncio.CancelledError, AssertionError):
        await answered
    return [f for f in ws.frames.frames if f["type"] == "error"]


async def test_a_client_that_reopens_its_sockets_gets_no_new_messages(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A socket's bucket starts full, so a client that closed each socket after its burst
    and opened another was never refused: 230 `watch` a second from one address, against
    the 40 its 20 sockets may send. A client's messages are counted over all its sockets,
    across reconnects: an address's anonymous sockets together at most half of what the
    sockets one client may hold may send (WS_MAX_PER_CLIENT, 2 here: MESSAGE_BURST at once,
    then one every MESSAGE_REFILL_S; the rest is kept for its signed-in shoppers)."""
    per_client = 2
    burst, per_second = MESSAGE_BURST * per_client / 2, per_client / MESSAGE_REFILL_S / 2
    join = {"type": "join", "productId": 1}  # answered at once: no shopper, no database
    settings = {"WS_MAX_PER_CLIENT": str(per_client)}
    with one_service(database_url, redis_url, tmp_path, **settings) as a:
        started = time.monotonic()
        taken = refused = 0
        for _ in range(20):  # sockets, one after another, each sending its own burst
            async with socket_to(a) as ws:
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
                answers = await _burst(ws, join)
                refused += sum(f["code"] == "rate_limited" for f in answers)
                taken += sum(f["code"] != "rate_limited" for f in answers)
            if refused:
                break
        elapsed = time.monotonic() - started
        assert refused, f"{taken} messages over 20 sockets, none refused"
        assert taken <= burst + per_second * elapsed + 1
        (refusal,) = [f for f in answers if f["code"] == "rate_limited"][:1]
        assert "from your address's sockets without a sign-in" in refusal["message"]


def _bearer(sub: str) -> dict[str, str]:
    signed = jwt.encode({"sub": sub, "exp": time.time() + 600}, JWT_SECRET, "HS256")
    return {"Authorization": f"Bearer {signed}"}


async def _refused(service: Service, headers: dict[str, str]) -> str:
    """The reason a socket opened with `headers` is closed 1013 for."""
    async with socket_to(service, additional_headers=headers) as again:
        await again.connection.wait_closed()
        assert again.connection.close_code == 1013
        return again.connection.close_reason or ""


async def test_shoppers_the_shop_signed_in_have_socket_limits_of_their_own(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Many shoppers share an address (an office, a mobile carrier's NAT): one of them
    taking WS_MAX_PER_CLIENT sockets left the others none. A shopper the shop signed in
    has sockets of their own; anyone else (an anonymous cookie costs nothing to replace)
    is counted by address. The address stays bounded whatever its accounts: at most
    MAX_CONNECTIONS_PER_CLIENT sockets (a scalper's accounts on one address filled the
    process, and honest pages got 1013), and one client's messages (the next test), of
    which a socket past its own spends nothing."""
    anyone = {"type": "join", "productId": 999_999}  # each answered with an error frame
    settings = {
        "WS_MAX_PER_CLIENT": "2",
        "MAX_CONNECTIONS_PER_CLIENT": "4",
        "SHOPPER_JWT_SECRET": JWT_SECRET,
    }
    with one_service(database_url, redis_url, tmp_path, **settings) as a:
        async with (
            socket_to(a, additional_headers=_bearer("alice")) as alice,
            socket_to(a, additional_headers=_bearer("alice")) as alice_too,
            socket_to(a, additional_headers=_bearer("bob")) as bob,
            socket_to(a) as anonymous,
        ):
            for ws in (alice, alice_too, bob, anonymous):  # one address, three clients
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            assert await _refused(a, _bearer("alice")) == "too many connections from you"
            # The address holds its MAX_CONNECTIONS_PER_CLIENT: another account is refused.
            assert await _refused(a, _bearer("carol")) == "too many connections from your address"
            # Alice's socket spends its messages (each `watch` of nothing is answered at
            # once, much faster than they are earned back); what it sends past them spends
            # nothing of Alice's or the address's, and Bob's and the anonymous page's are
            # still read.
            with contextlib.suppress(ConnectionClosed):  # at her tenth refusal
                for _ in range(MESSAGE_BURST + 20):
                    await alice.send({"type": "watch", "reservations": []})
            await alice.frames.wait_for(_error("rate_limited"), within=20)
            for ws in (bob, anonymous):
                await ws.send(anyone)
                (answer,) = await ws.frames.wait_for(lambda f: f["type"] == "error", within=20)
                assert answer["code"] != "rate_limited", answer


async def test_one_address_s_accounts_send_no_more_than_its_sockets_may(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A scalper's accounts on one address, one after another, each with a full allowance
    of its own: the address's messages over all of them are at most one client's (what
    its WS_MAX_PER_CLIENT sockets may send together: 1 here, 30 at once, then 2 a
    second), across reconnects. Each message costs a database read, and 40 a second from
    one address took another shopper's reservation from 0.1 to 2 s (p95)."""
    anyone = {"type": "join", "productId": 999_999}
    burst, per_second = MESSAGE_BURST, 1 / MESSAGE_REFILL_S
    settings = {
        "WS_MAX_PER_CLIENT": "1",
        "MAX_CONNECTIONS_PER_CLIENT": "3",
        "SHOPPER_JWT_SECRET": JWT_SECRET,
    }
    with one_service(database_url, redis_url, tmp_path, **settings) as a:
        started = time.monotonic()
        taken = 0
        refusals: list[Frame] = []
        for n in range(10):  # accounts, one after another, each sending its socket's burst
            async with socket_to(a, additional_headers=_bearer(f"scalper-{n}")) as ws:
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
                answers = await _burst(ws, anyone)
                refusals += [f for f in answers if f["code"] == "rate_limited"]
                taken += sum(f["code"] != "rate_limited" for f in answers)
            if refusals:
                break
        elapsed = time.monotonic() - started
        assert refusals, f"{taken} messages from one address's ten accounts, none refused"
        assert taken <= burst + per_second * elapsed + 1
        assert "from your address over its sockets" in refusals[0]["message"]


async def test_an_anonymous_flood_at_an_address_leaves_its_signed_in_shoppers_their_messages(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """One anonymous script at an address spent the address's whole allowance (one
    client's), and every shopper the shop signed in behind that address (an office, a
    carrier's NAT) had their messages refused. The address's anonymous sockets have a
    share of their own within it, half (WS_MAX_PER_CLIENT 1 here: 15 at once, then 1 a
    second), so the other half stays its signed-in shoppers'."""
    anyone = {"type": "join", "productId": 999_999}  # each answered with an error frame
    settings = {
        "WS_MAX_PER_CLIENT": "1",
        "MAX_CONNECTIONS_PER_CLIENT": "3",
        "SHOPPER_JWT_SECRET": JWT_SECRET,
    }
    with one_service(database_url, redis_url, tmp_path, **settings) as a:
        async with (
            socket_to(a) as script,
            socket_to(a, additional_headers=_bearer("alice")) as alice,
        ):
            for ws in (script, alice):
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            started = time.monotonic()
            answers = await _burst(script, anyone)  # its socket's burst: 30
            elapsed = time.monotonic() - started
            # Alice, signed in behind the same address, right after: her messages are read
            # (before, the script had taken the address's allowance, and they were refused).
            sent = 10
            for _ in range(sent):
                await alice.send(anyone)
            told = await alice.frames.wait_for(lambda f: f["type"] == "error", count=sent)
            assert not [f for f in told if f["code"] == "rate_limited"], told
            taken = sum(f["code"] != "rate_limited" for f in answers)
            refusals = [f for f in answers if f["code"] == "rate_limited"]
            assert refusals, f"{taken} messages of an anonymous script, none refused"
            assert taken <= MESSAGE_BURST / 2 + elapsed / MESSAGE_REFILL_S / 2 + 1
            assert "from your address's sockets without a sign-in" in refusals[0]["message"]


async def test_a_page_joins_a_waiting_room_over_its_socket(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """`{"type": "join", "productId": …}` over the socket the page holds: the ticket frame
    answers it (the same ticket when sent again), as POST /api/products/{id}/queue would;
    a socket without a shopper, a product without a room, or a malformed join get an
    `error` frame naming the product, and the socket stays open."""
    with one_service(database_url, redis_url, tmp_path) as a:
        starts = datetime.now(UTC) + timedelta(minutes=5)
        drop = await a.new_product(3, queue="random", saleStartsAt=starts.isoformat())
        plain = await a.new_product(3)
        async with a.client() as client:
            cookie = (await client.get("/api/me")).headers["set-cookie"].split(";")[0]
        async with socket_to(a, additional_headers={"Cookie": cookie}) as ws:
            await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            await ws.send({"type": "join", "productId": drop["id"]})
            (ticket,) = await ws.frames.wait_for(lambda f: f["type"] == "ticket")
            assert ticket["ticket"]["productId"] == drop["id"]
            assert ticket["ticket"]["state"] == "waiting"
            assert ticket["ticket"]["position"] is None  # a random room before its start
            await ws.send({"type": "join", "productId": drop["id"]})  # again: the same
            frames = await ws.frames.wait_for(lambda f: f["type"] == "ticket", count=2)
            assert frames[1]["ticket"]["joinedAt"] == ticket["ticket"]["joinedAt"]
            await ws.send({"type": "join", "productId": plain["id"]})
            await ws.frames.wait_for(
                lambda f: (
                    f["type"] == "error"
                    and f["code"] == "queue_off"
                    and f["productId"] == plain["id"]
                )
            )
            await ws.send({"type": "join", "productId": "3"})
            await ws.frames.wait_for(_error("invalid_join"))
        async with a.client(headers={"Cookie": cookie}) as client:
            over_http = await client.get(f"/api/products/{drop['id']}/queue")
        assert over_http.json()["joinedAt"] == ticket["ticket"]["joinedAt"]
        async with socket_to(a) as anonymous:
            await anonymous.frames.wait_for(lambda f: f["type"] == "snapshot")
            await anonymous.send({"type": "join", "productId": drop["id"]})
            await anonymous.frames.wait_for(_error("no_shopper"))


class _RawPage:
    """A page's socket, byte by byte: its frames written as sent (masked, split or together
    as the test says), what the server sends read and parsed here."""

    def __init__(self, service: Service, cookie: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", service.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        self.buffer = response.partition(b"\r\n\r\n")[2]
        self.texts: list[dict[str, Any]] = []
        self.close_code: int | None = None

    @staticmethod
    def frame(message: object, opcode: int = 0x1) -> bytes:
        """A client's frame (FIN, masked) of `message` (JSON unless it is text already)."""
        payload = message.encode() if isinstance(message, str) else to_json(message)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked

    def send(self, *chunks: bytes) -> None:
        """Each chunk in a write of its own, the next once the server has surely read it
        apart (it has no way to tell it was split: this only makes the split likely)."""
        for n, chunk in enumerate(chunks):
            if n:
                time.sleep(0.05)
            self.sock.sendall(chunk)

    def read(self, done: Callable[[list[dict[str, Any]]], bool], within: float = 10) -> None:
        """Read the server's frames until `done(texts)` (each text frame parsed), or its
        close."""
        deadline = time.monotonic() + within
        while not done(self.texts) and self.close_code is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not within {within} s; read: {self.texts}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.close_code = self.close_code or 1006
                break
            self.buffer += chunk
            while len(self.buffer) >= 2:
                opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
                offset = 2
                if length == 126:
                    length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
                if len(self.buffer) < offset + length:
                    break
                payload = self.buffer[offset : offset + length]
                self.buffer = self.buffer[offset + length :]
                if opcode == 0x1:
                    self.texts.append(from_json(payload))
                elif opcode == 0x8:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                elif opcode == 0x9:  # a ping: the pong, masked
                    self.sock.sendall(self.frame(payload.decode(errors="replace"), 0xA))

    def answers(self) -> list[tuple[str, object]]:
        """The answers to messages so far: each ticket frame's product and each error's
        code, in the order they came."""
        return [
            ("ticket", f["ticket"]["productId"]) if f["type"] == "ticket" else ("error", f["code"])
            for f in self.texts
            if f["type"] in ("ticket", "error")
        ]

    def close(self) -> None:
        self.sock.close()


async def test_joins_are_answered_in_order_however_their_frames_arrive(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A page's joins are taken in the socket's protocol (the waiting room's bench: each
    through the ASGI queue and the socket's task cost a third of a join), and every other
    message the ordinary way: whatever the mix, and however the frames are cut into reads
    (a frame split in its header, in its payload; several frames, a ping among them, in
    one read), every message is answered, in the order sent, as before; malformed joins
    get their error frames."""
    with one_service(database_url, redis_url, tmp_path) as a:
        starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        one = await a.new_product(3, queue="random", saleStartsAt=starts)
        two = await a.new_product(3, queue="fifo", saleStartsAt=starts)
        plain = await a.new_product(3)
        async with a.client() as client:
            cookie = (await client.get("/api/me")).headers["set-cookie"].split(";")[0]
        page = await asyncio.to_thread(_RawPage, a, cookie)
        try:
            await asyncio.to_thread(page.read, lambda t: any(f["type"] == "snapshot" for f in t))
            join_one = page.frame(f'{{"type":"join","productId":{one["id"]}}}')
            join_two = page.frame({"type": "join", "productId": two["id"]})
            # Split inside the header, then inside the payload.
            await asyncio.to_thread(page.send, join_one[:1], join_one[1:9], join_one[9:])
            await asyncio.to_thread(page.read, lambda t: len(page.answers()) == 1)
            # Several in one read, a ping among them, a general message and malformed joins.
            burst = b"".join(
                [
                    join_two,
                    page.frame("hi", 0x9),
                    page.frame({"type": "watch", "reservations": ["short"]}),
                    join_one,
                    page.frame({"type": "join", "productId": plain["id"]}),
                    page.frame({"type": "join", "productId": "3"}),
                    page.frame({"type": "join", "productId": 987654}),
                    join_two,
                ]
            )
            await asyncio.to_thread(page.send, burst[:40], burst[40:])
            await asyncio.to_thread(page.read, lambda t: len(page.answers()) == 8)
            assert page.answers() == [
                ("ticket", one["id"]),
                ("ticket", two["id"]),
                ("error", "invalid_watch"),
                ("ticket", one["id"]),
                ("error", "queue_off"),
                ("error", "invalid_join"),
                ("error", "product_not_found"),
                ("ticket", two["id"]),
            ]
            tickets = [f["ticket"] for f in page.texts if f["type"] == "ticket"]
            assert tickets[0]["joinedAt"] == tickets[2]["joinedAt"]  # one ticket each
            assert tickets[1]["joinedAt"] == tickets[3]["joinedAt"]
            assert {t["state"] for t in tickets} == {"waiting"}
            assert page.close_code is None
        finally:
            page.close()
        assert "Traceback" not in a.logs()


def _at_least(page: _RawPage, count: int, _: object) -> bool:
    return len(page.answers()) >= count


async def test_joins_past_a_socket_s_messages_are_refused_then_it_is_closed(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Joins taken in the protocol count against the socket's messages as any other: past
    MESSAGE_BURST (and what refills meanwhile) each is refused `rate_limited`, not joined,
    and the socket is closed 1008 at its MAX_BAD_MESSAGES-th refusal."""
    with one_service(database_url, redis_url, tmp_path) as a:
        starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        room = await a.new_product(3, queue="fifo", saleStartsAt=starts)
        async with a.client() as client:
            cookie = (await client.get("/api/me")).headers["set-cookie"].split(";")[0]
        page = await asyncio.to_thread(_RawPage, a, cookie)
        join = page.frame({"type": "join", "productId": room["id"]})
        try:
            await asyncio.to_thread(page.read, lambda t: any(f["type"] == "snapshot" for f in t))
            sent = 0
            while page.close_code is None and sent < 200:
                sent += 1
                await asyncio.to_thread(page.send, join)  # one at a time, each answered
                answered = functools.partial(_at_least, page, sent)
                await asyncio.to_thread(page.read, answered)
            codes = [code for kind, code in page.answers() if kind == "error"]
            assert codes == ["rate_limited"] * MAX_BAD_MESSAGES
            assert page.close_code == 1008
            assert sent - MAX_BAD_MESSAGES >= MESSAGE_BURST
        finally:
            page.close()
        assert "Traceback" not in a.logs()


async def test_a_join_whose_socket_closes_before_its_answer_is_still_made(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A page that joins and is gone before its answer (closed, or dropped) leaves its
    ticket made (its POST or its socket again reads it) and the process serving others."""
    with one_service(database_url, redis_url, tmp_path) as a:
        room = await a.new_product(3, queue="fifo")
        async with a.client() as client:
            cookie = (await client.get("/api/me")).headers["set-cookie"].split(";")[0]
        page = await asyncio.to_thread(_RawPage, a, cookie)
        await asyncio.to_thread(page.read, lambda t: any(f["type"] == "snapshot" for f in t))
        close = struct.pack("!H", 1000)
        await asyncio.to_thread(
            page.send,
            page.frame({"type": "join", "productId": room["id"]})
            + bytes([0x88, 0x80 | len(close)])
            + b"\0\0\0\0"
            + close,
        )
        page.close()

        async def made() -> bool:
            async with a.client(headers={"Cookie": cookie}) as client:
                return (await client.get(f"/api/products/{room['id']}/queue")).status_code == 200

        await eventually(made, within=10, what="the ticket of a join whose page left")
        async with socket_to(a, additional_headers={"Cookie": cookie}) as ws:
            await ws.send({"type": "join", "productId": room["id"]})
            await ws.frames.wait_for(lambda f: f["type"] == "ticket")
        assert "Traceback" not in a.logs()


async def test_a_socket_opened_with_a_shop_token_is_nobodys_once_it_expires(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A socket is told its shopper once, at its handshake, and may stay open for days: one
    opened with the shop's token went on joining rooms and watching holds as that shopper
    long after the token expired (and would be refused over HTTP). Past `exp` and the
    leeway, it is nobody's."""
    with one_service(database_url, redis_url, tmp_path, SHOPPER_JWT_SECRET=JWT_SECRET) as a:
        waitlist = await a.new_product(3, queue="fifo")
        other = await a.new_product(3, queue="fifo")
        # Expired 27 s ago: valid for 3 s more, with the 30 s of leeway.
        signed = jwt.encode({"sub": "expiring", "exp": time.time() - 27}, JWT_SECRET, "HS256")
        bearer = {"Authorization": f"Bearer {signed}"}
        async with socket_to(a, additional_headers=bearer) as ws:
            await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            await ws.send({"type": "join", "productId": waitlist["id"]})
            (ticket,) = await ws.frames.wait_for(lambda f: f["type"] == "ticket")
            assert ticket["ticket"]["productId"] == waitlist["id"]
            joins = 0

            async def refused() -> bool:
                nonlocal joins
                joins += 1
                await ws.send({"type": "join", "productId": other["id"]})
                await ws.frames.wait_for(lambda f: _answers(f, other["id"]), count=joins)
                if any(_error_saying("has expired")(f) for f in ws.frames.frames):
                    return True
                # A join at most as often as a socket earns one (MESSAGE_REFILL_S): the token
                # runs out in about 3 s, sooner than the socket's burst would.
                await asyncio.sleep(MESSAGE_REFILL_S)
                return False

            await eventually(refused, within=15, what="joins refused once the token expired")
            assert [f["code"] for f in ws.frames.frames if _error_saying("expired")(f)] == [
                "no_shopper"
            ]
        async with a.client(headers=bearer) as client:
            over_http = await client.get(f"/api/products/{waitlist['id']}/queue")
        assert over_http.status_code == 401


async def test_an_expired_shop_token_s_socket_is_told_no_more_of_its_holds(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Past its token's `exp` (and the leeway) a socket is nobody's: it could no longer
    watch the shopper's holds, but kept being told of those it watched before, for as long
    as it stayed open."""
    with one_service(database_url, redis_url, tmp_path, SHOPPER_JWT_SECRET=JWT_SECRET) as a:
        product = await a.new_product(5)
        # Expired 25 s ago: valid for 5 s more, with the 30 s of leeway.
        signed = jwt.encode({"sub": "expiring", "exp": time.time() - 25}, JWT_SECRET, "HS256")
        bearer = {"Authorization": f"Bearer {signed}"}
        async with a.client(headers=bearer) as client:
            made = await client.post(
                "/api/reservations", json={"productId": product["id"], "quantity": 1}
            )
            assert made.status_code == 201, made.text
            hold = made.json()
            async with socket_to(a, additional_headers=bearer) as ws:
                await ws.send({"type": "watch", "reservations": [hold["id"]]})
                await ws.status(hold["id"], "ACTIVE")

                async def expired() -> bool:
                    mine = await client.get(f"/api/reservations/{hold['id']}")
                    return mine.status_code == 401

                await eventually(expired, within=15, what="the token to expire")
                async with a.client(headers=a.admin_headers()) as operator:
                    cancelled = await operator.post(
                        f"/api/admin/reservations/{hold['id']}/cancel", json={"reason": "test"}
                    )
                    assert cancelled.status_code == 200, cancelled.text
                    # A later change of the product, after the cancel's: once the socket
                    # has its stock frame, it has had every frame of the cancel.
                    restocked = await operator.post(
                        f"/api/admin/products/{product['id']}/restock", json={"quantity": 1}
                    )
                    assert restocked.status_code == 200, restocked.text
                await ws.stock(product["id"], restocked.json()["availableStock"])
                told = [
                    f["reservation"]["status"]
                    for f in ws.frames.frames
                    if f["type"] == "reservation"
                ]
                assert told == ["ACTIVE"]


def _answers(frame: Frame, product_id: int) -> bool:
    """Whether `frame` answers a join of `product_id`: its ticket, or an error naming it."""
    if frame["type"] == "ticket":
        return bool(frame["ticket"]["productId"] == product_id)
    return frame["type"] == "error" and frame.get("productId") == product_id


def _error(code: str) -> Callable[[Frame], bool]:
    return lambda frame: frame["type"] == "error" and frame["code"] == code


def _error_saying(text: str) -> Callable[[Frame], bool]:
    return lambda frame: frame["type"] == "error" and text in frame["message"]


async def test_an_oversized_message_closes_the_socket(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path) as a:
        async with socket_to(a) as ws:
            await ws.send({"type": "watch", "reservations": ["x" * 8_000]})
            await ws.connection.wait_closed()
            assert ws.connection.close_code == 1009


async def test_a_foreign_origin_is_refused_and_the_own_origin_allowed(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path, CORS_ORIGINS="https://shop.example") as a:
        with pytest.raises(InvalidStatus) as refused:
            async with socket_to(a, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        for origin in (a.base_url, "https://shop.example"):
            async with socket_to(a, origin=origin) as ws:
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")


async def test_the_connection_cap_answers_1013(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with one_service(database_url, redis_url, tmp_path, WS_MAX_CLIENTS="2") as a:
        async with socket_to(a) as one, socket_to(a) as two:
            await one.frames.wait_for(lambda f: f["type"] == "snapshot")
            await two.frames.wait_for(lambda f: f["type"] == "snapshot")
            async with socket_to(a) as three:
                await three.connection.wait_closed()
                assert three.connection.close_code == 1013
        async with socket_to(a) as again:  # room again once they left
            await again.frames.wait_for(lambda f: f["type"] == "snapshot")


async def test_polling_gets_304_while_nothing_changes(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with two_services(database_url, redis_url, tmp_path, worker=False) as (a, b):
        product = await a.new_product(5)
        async with b.client() as client:
            first = await client.get("/api/products")
            etag = first.headers["etag"]
            assert (
                await client.get("/api/products", headers={"If-None-Match": etag})
            ).status_code == 304
            await reserve(a, product["id"])
            changed = await _eventually_changed(client, etag)
            # b's own list learned of a's hold through the stock frame, held units too.
            (seen,) = (p for p in changed.json() if p["id"] == product["id"])
            assert (seen["availableStock"], seen["heldStock"]) == (4, 1)


async def _eventually_changed(client: httpx.AsyncClient, etag: str) -> httpx.Response:
    """Poll as a page does (If-None-Match) until the list changes."""
    for _ in range(200):
        response = await client.get("/api/products", headers={"If-None-Match": etag})
        if response.status_code == 200:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError("the product list never changed")


async def test_a_socket_whose_shop_token_expires_is_its_address_s_from_then_on(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Past its token's `exp` (and the leeway) a socket is nobody's, and it is counted as
    what it now is, a socket of its address: it kept the shopper's place (and messages)
    for as long as it stayed open, beside the address's own WS_MAX_PER_CLIENT. Here the
    address already holds its one anonymous socket: at expiry the socket is closed 1013,
    as one opened without the token would have been refused."""
    settings = {
        "WS_MAX_PER_CLIENT": "1",
        "MAX_CONNECTIONS_PER_CLIENT": "4",
        "SHOPPER_JWT_SECRET": JWT_SECRET,
    }
    with one_service(database_url, redis_url, tmp_path, **settings) as a:
        # Expired 27 s ago: valid for 3 s more, with the 30 s of leeway.
        signed = jwt.encode({"sub": "expiring", "exp": time.time() - 27}, JWT_SECRET, "HS256")
        async with (
            socket_to(a) as anonymous,
            socket_to(a, additional_headers={"Authorization": f"Bearer {signed}"}) as expiring,
        ):
            for ws in (anonymous, expiring):
                await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            async with asyncio.timeout(20):
                await expiring.connection.wait_closed()
            assert expiring.connection.close_code == 1013
            assert expiring.connection.close_reason == "too many connections from your address"
            await anonymous.send({"type": "join", "productId": 999_999})
            await anonymous.frames.wait_for(_error("no_shopper"))  # it stays open, answered


def _bad_reservation_news(hold: dict[str, Any]) -> list[bytes]:
    """Reservation messages a faulty peer may publish, about `hold` where they name one:
    each reached `Hub.publish` unchecked (a KeyError and its traceback in the log for each
    one without a reservation), or was passed to the pages watching the hold as it was."""
    good = {k: hold[k] for k in ("id", "productId", "quantity", "status", "product")}
    product_id = hold["productId"]
    return [
        b'{"type":"reservation"}',
        b'{"type":"reservation","reservation":null}',
        b'{"type":"reservation","reservation":[1,2]}',
        b'{"type":"reservation","reservation":{"status":"CANCELLED"}}',
        to_json({"type": "reservation", "reservation": {**good, "id": 12}}),
        to_json({"type": "reservation", "reservation": {**good, "status": "GONE"}}),
        to_json({"type": "reservation", "reservation": {**good, "quantity": "3"}}),
        to_json({"type": "reservation", "reservation": {**good, "productId": 2**70}}),
        to_json({"type": "reservation", "reservation": {**good, "product": None}}),
        to_json({"type": "reservation", "reservation": {**good, "product": {"id": product_id}}}),
        to_json({"type": "reservation", "reservation": {k: good[k] for k in ("id", "status")}}),
        to_json({"type": "reservation", "reservation": {**good, "quantity": 0}}),
        to_json({"type": "reservation", "reservation": {**good, "productId": True}}),
        to_json({"type": "reservation", "reservation": {**good, "quantity": 1}}).replace(
            b'"quantity":1', b'"quantity":NaN'
        ),
        to_json({"type": "reservation", "reservation": {**good, "quantity": 1}}).replace(
            b'"quantity":1', b'"quantity":1e400'
        ),
    ]


async def test_malformed_reservation_messages_change_nothing_and_are_logged_once(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """Reservation messages on the channel are checked as stock and room ones are
    (`reservation_from_message`): a malformed one reaches no listener and no page, and
    however many come, the web log has one line about them a minute, no traceback; a
    sound one after them still reaches the page watching its hold."""
    with one_service(database_url, own_redis.url, tmp_path, HOLD_SECONDS="120") as a:
        product = await a.new_product(10)
        hold = await reserve(a, product["id"])
        async with socket_to(a) as ws, Redis.from_url(own_redis.url) as redis:
            await ws.send({"type": "watch", "reservations": [hold["id"]]})
            await ws.status(hold["id"], "ACTIVE")
            for message in _bad_reservation_news(hold) * 3:
                await redis.publish(events_channel(0), message)
            async with a.client() as http:
                cancelled = await http.post(f"/api/reservations/{hold['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            await ws.status(hold["id"], "CANCELLED")
            told = [f for f in ws.frames.frames if f["type"] == "reservation"]
            assert [f["reservation"]["status"] for f in told] == ["ACTIVE", "CANCELLED"]
        log = a.web.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert sum("malformed" in line for line in log.splitlines()) == 1, log[-3000:]


async def test_a_product_taken_back_from_the_database_reaches_open_sockets_and_changes_on(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """A stock message far ahead (a faulty peer's 2**62; a database restored under running
    processes has the same effect: every version the database now gives is far below the
    ones told) is undone by the catalog's 5 s reload, but the hub kept the far version as
    the newest it had sent, and dropped every stock frame below it: open sockets were
    frozen on that product. The reload's product comes as a `product` frame marked
    `reset`, and the product's frames go on from its version."""
    with one_service(database_url, own_redis.url, tmp_path, HOLD_SECONDS="120") as a:
        product = await a.new_product(10)
        far = 2**62
        async with socket_to(a) as ws, Redis.from_url(own_redis.url) as redis:
            await ws.frames.wait_for(lambda f: f["type"] == "snapshot")
            message = {"type": "stock", "productId": product["id"], "availableStock": 0}
            await redis.publish(events_channel(0), to_json({**message, "version": far}))
            assert (await ws.stock(product["id"], 0))["version"] == far
            (reset,) = await ws.frames.wait_for(
                lambda f: f["type"] == "product" and f.get("reset") is True, within=15
            )
            assert reset["product"]["id"] == product["id"]
            assert reset["product"]["availableStock"] == 10
            assert reset["product"]["version"] == product["version"]
            held = await reserve(a, product["id"])
            after = await ws.stock(product["id"], 9)
            assert after["version"] == held["product"]["version"] > product["version"]
