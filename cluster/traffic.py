"""Shoppers and pages, through the edge, as the drills and the benchmark drive them.

- `Shop`: the HTTP API through the edge. A shopper reserves with an `Idempotency-Key` of its
  own and, like the shop's page, tries again after a 502/503/504 or a lost connection
  (after `Retry-After` when the answer gives one) until it gets an answer that decides
  (201, or a 4xx that says why not) or its patience runs out. Every attempt is recorded:
  what it was answered, by which app host (the edge's `X-Edge-Server`), and when.
- `Pages`: open `/ws` sockets that keep each product's newest stock (by version, as the
  README's protocol asks) and, like the page, reconnect with backoff and jitter when their
  socket closes: to whichever app host the edge picks.
- `SteadySale`: shoppers in a loop (reserve, then buy, cancel or let the hold expire), for
  drills that break something while a sale is going on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic_core import from_json, to_json
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.rawhttp import Connection, Response, request_bytes

DECIDED = {200, 201, 400, 404, 409, 413, 415, 422, 429}
RETRIED = {502, 503, 504}


@dataclass(frozen=True)
class Attempt:
    """One request and its answer. `status` 0: no answer (the connection failed)."""

    started: float  # time.monotonic()
    finished: float
    status: int
    code: str = ""
    retry_after: str | None = None
    server: str = ""  # the app host that answered, per the edge ("" if none did)

    @property
    def host(self) -> str:
        """`app1` for both `app1` and the edge's panic-mode entry `app1-panic`."""
        return self.server.split("-")[0]

    @property
    def acceptable_unavailable(self) -> bool:
        """A 503 that says when to come back: the only failure a shopper may get while a
        shared part (the database) restarts."""
        return self.status == 503 and self.retry_after is not None


@dataclass
class Outcome:
    """What one shopper's reservation came to, after however many attempts (recorded as
    they are answered, so that a shopper stopped mid-request leaves what it had heard)."""

    key: str
    attempts: list[Attempt] = field(default_factory=list)
    hold: dict[str, Any] | None = None
    # Stopped (its task cancelled: a drill stopping its shoppers) before an answer that
    # decides: a request it had sent may have made a hold it never heard of.
    cancelled: bool = False

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def decided(self) -> bool:
        return bool(self.attempts) and not self.cancelled and self.final.status in DECIDED

    @property
    def in_doubt(self) -> list[Attempt]:
        """Its attempts answered with nothing that says what the request did: no answer
        (the connection failed, or the shopper stopped waiting after `within`) or a
        502/503/504. Such a request may have made a hold, even later than an answer to a
        retry: the drill's shoppers wait 10 s for an answer, while a host cut off from the
        database carries out what it had queued once it can (a statement may take the
        busy timeout plus PG_STATEMENT_MARGIN_S, server/storage/database.py, and requests
        queued behind it wait for it; server/service/batching.py runs a request whose
        caller went away all the same)."""
        return [a for a in self.attempts if a.status not in DECIDED]

    @property
    def unknown(self) -> bool:
        """Whether the shopper cannot know what its request did: it was stopped with a
        request in flight, or some attempt's answer said nothing (`in_doubt`), including
        when a retry's did later (a 409 to the retry does not undo the attempt before it).
        Only such a request may leave a hold that no shopper was answered 201 for, and a
        retry with its key tells (README, Idempotency)."""
        return self.cancelled or not self.decided or bool(self.in_doubt)


class Pool:
    """Keep-alive HTTP/1.1 connections to one address, at most `size` in use at once.

    On bench/rawhttp.py's lean client: a thousand shoppers at once through a general client
    (httpx) took 16-24 s of the client's own CPU on this machine, where this takes well
    under a second, so that a storm is a storm for the server, not for the client."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(size)

    async def warm(self, count: int) -> None:
        """Open `count` connections ahead (as pages already open have theirs)."""
        for start in range(0, count, 200):  # in batches: the listen backlog is finite
            self.idle += await asyncio.gather(
                *(Connection.open(self.host, self.port) for _ in range(min(200, count - start)))
            )

    async def request(self, data: bytes, within: float) -> Response:
        """One request's response (status 0: the connection failed or closed first)."""
        async with self.slots:
            while self.idle and self.idle[-1].closed:
                self.idle.pop().close()
            try:
                connection = (
                    self.idle.pop()
                    if self.idle
                    else await asyncio.wait_for(Connection.open(self.host, self.port), within)
                )
            except (OSError, TimeoutError):
                return Response(0, b"", b"")
            try:
                response = await asyncio.wait_for(connection.request(data), within)
            except TimeoutError:
                connection.close()
                return Response(0, b"", b"timeout")
            if response.status == 0 or response.header(b"connection") == b"close":
                connection.close()
            else:
                self.idle.append(connection)
            return response

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class Shop:
    """The API through the edge, with the operator's token."""

    def __init__(self, base_url: str, admin_token: str, *, connections: int = 200) -> None:
        self.base_url = base_url
        address = urlsplit(base_url)
        self.hostport = address.netloc
        self.pool = Pool(address.hostname or "", address.port or 80, connections)
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.attempts: list[Attempt] = []  # every attempt by every shopper, in order
        # Every reservation by its Idempotency-Key, from its first attempt on (its `attempts`
        # are filled in once it is over): what the drills' books look a hold's key up in.
        self.reservations: dict[str, Outcome] = {}

    async def aclose(self) -> None:
        self.pool.close()

    async def new_product(self, stock: int, *, starts_in: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": f"Drill {secrets.token_hex(3)}", "price": 5, "stock": stock}
        if starts_in is not None:
            starts = time.time() + starts_in
            body["saleStartsAt"] = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(starts))
                + f".{int(starts % 1 * 1000):03d}Z"
            )
        attempts, product = await self.until_decided(
            "POST", "/api/admin/products", json=body, headers=self.admin
        )
        if attempts[-1].status != 201:
            raise RuntimeError(f"could not make a product: {attempts[-1]}")
        assert isinstance(product, dict)
        return product

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        within: float = 10.0,
    ) -> tuple[Attempt, Any]:
        """One attempt, recorded; its answer's JSON body (None if it had none)."""
        body = b"" if json is None else to_json(json)
        data = request_bytes(method, path, self.hostport, body, headers)
        started = time.monotonic()
        response = await self.pool.request(data, within)
        finished = time.monotonic()
        try:
            parsed = from_json(response.body) if response.body else None
        except ValueError:
            parsed = None
        code = parsed.get("code", "") if isinstance(parsed, dict) else ""
        if response.status == 0:
            code = response.body.decode() or "no answer"
        attempt = Attempt(
            started,
            finished,
            response.status,
            str(code),
            _text(response.header(b"retry-after")),
            _text(response.header(b"x-edge-server")) or "",
        )
        self.attempts.append(attempt)
        return attempt, parsed

    async def until_decided(
        self,
        method: str,
        path: str,
        *,
        patience: float = 60.0,
        attempts: list[Attempt] | None = None,
        **kwargs: Any,
    ) -> tuple[list[Attempt], Any]:
        """Send the request until the answer decides, as a shopper's page would. Each
        attempt is appended to `attempts` (a new list if None) as it is answered."""
        attempts = [] if attempts is None else attempts
        give_up = time.monotonic() + patience
        backoff = 0.2
        while True:
            attempt, body = await self.request(method, path, **kwargs)
            attempts.append(attempt)
            if attempt.status in DECIDED or time.monotonic() > give_up:
                return attempts, body
            wait = backoff * random.uniform(0.5, 1.5)
            if attempt.retry_after and attempt.retry_after.isdigit():
                wait = max(wait, float(attempt.retry_after))
            backoff = min(backoff * 2, 2.0)
            await asyncio.sleep(min(wait, max(0.0, give_up - time.monotonic())))

    async def reserve(
        self, product_id: int, *, quantity: int = 1, key: str | None = None, patience: float = 60
    ) -> Outcome:
        """One shopper's reservation, until decided or out of patience. Cancelled (a drill
        stopping its shoppers), the outcome is marked `cancelled`: whatever the request in
        flight did, this shopper never heard of it."""
        outcome = Outcome(key or secrets.token_urlsafe(12))
        self.reservations.setdefault(outcome.key, outcome)
        try:
            _, body = await self.until_decided(
                "POST",
                "/api/reservations",
                json={"productId": product_id, "quantity": quantity},
                headers={"Idempotency-Key": outcome.key},
                patience=patience,
                attempts=outcome.attempts,
            )
        except asyncio.CancelledError:
            outcome.cancelled = True
            raise
        if outcome.final.status == 201:
            outcome.hold = body
        return outcome

    async def finish(self, hold_id: str, action: str) -> Attempt:
        """`complete` or `cancel` a hold (both are safe to send again)."""
        attempts, _ = await self.until_decided("POST", f"/api/reservations/{hold_id}/{action}")
        return attempts[-1]

    async def stock(self, product_id: int) -> int:
        attempts, body = await self.until_decided("GET", f"/api/products/{product_id}")
        assert attempts[-1].status == 200, attempts[-1]
        return int(body["availableStock"])


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class Page:
    """One open shop page: a socket to `/ws` through the edge, reconnected when it closes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stock: dict[int, tuple[int, int]] = {}  # product → (version, available)
        self.seen: dict[int, list[tuple[int, float]]] = {}  # product → [(version, when)]
        self.hosts: list[str] = []  # the app host of each connection, in order
        self.connected = asyncio.Event()
        self.connection: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self.hosts[-1].split("-")[0] if self.hosts and self.connected.is_set() else ""

    @property
    def reconnects(self) -> int:
        return max(0, len(self.hosts) - 1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()

    def available(self, product_id: int) -> int | None:
        found = self.stock.get(product_id)
        return None if found is None else found[1]

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with connect(self.url, open_timeout=5, max_queue=None) as connection:
                    self.connection = connection
                    assert connection.response is not None
                    self.hosts.append(connection.response.headers.get("x-edge-server", "?"))
                    async for message in connection:
                        self._frame(from_json(message))
                        if not self.connected.is_set():
                            self.connected.set()
                            backoff = 0.1
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                pass
            self.connected.clear()
            self.connection = None
            # As the page does: back off with jitter, so that a closed host's pages don't
            # all land on the next one in the same millisecond.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 2.0)

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "snapshot":
            for product in frame["products"]:
                self._keep(product["id"], product["version"], product["availableStock"])
        elif kind == "product":
            product = frame["product"]
            self._keep(product["id"], product["version"], product["availableStock"])
        elif kind == "stock":
            self._keep(frame["productId"], frame["version"], frame["availableStock"])

    def _keep(self, product_id: int, version: int, available: int) -> None:
        current = self.stock.get(product_id)
        if current is None or version > current[0]:
            self.stock[product_id] = (version, available)
            self.seen.setdefault(product_id, []).append((version, time.monotonic()))

    def first_seen(self, product_id: int, version: int) -> float | None:
        """When this page first held `version` (or newer) of the product."""
        return next((t for v, t in self.seen.get(product_id, []) if v >= version), None)


class Pages:
    """`count` open pages."""

    def __init__(self, ws_url: str, count: int) -> None:
        self.pages = [Page(ws_url) for _ in range(count)]

    def __iter__(self) -> Any:
        return iter(self.pages)

    async def open(self, within: float = 30.0) -> None:
        for page in self.pages:
            page.start()
        await asyncio.wait_for(asyncio.gather(*(p.connected.wait() for p in self.pages)), within)

    async def close(self) -> None:
        await asyncio.gather(*(page.stop() for page in self.pages))

    async def spread(self, hosts: list[str], within: float = 30.0) -> None:
        """Close every socket, as a deploy would, so that the pages reconnect through the
        edge and spread over `hosts` again (a socket stays where it was opened)."""
        for page in self.pages:
            if page.connection is not None:
                await page.connection.close()

        def spread() -> bool:
            return all(p.connected.is_set() for p in self.pages) and all(self.on(h) for h in hosts)

        deadline = time.monotonic() + within
        while not spread():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pages did not spread over {hosts}")
            await asyncio.sleep(0.05)

    def on(self, host: str) -> list[Page]:
        return [p for p in self.pages if p.host == host]

    def wrong(self, expected: dict[int, int]) -> list[str]:
        """Pages that are not connected or do not show `expected` (product → available)."""
        problems = []
        for i, page in enumerate(self.pages):
            if not page.connected.is_set():
                problems.append(f"page {i} is not connected")
                continue
            for product_id, available in expected.items():
                shown = page.available(product_id)
                if shown != available:
                    problems.append(f"page {i} shows {shown} of #{product_id}, not {available}")
        return problems

    async def until_showing(self, expected: dict[int, int], within: float = 20.0) -> list[str]:
        """Wait until every page is connected and shows `expected`; what is still wrong."""
        deadline = time.monotonic() + within
        # Polled: the state is forty sockets' worth of frames, and a deadline is the point.
        while (problems := self.wrong(expected)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return problems

    def delivered(self, product_id: int, version: int) -> float | None:
        """When the last page got `version` of the product (None: some page has not)."""
        times = [p.first_seen(product_id, version) for p in self.pages]
        return None if any(t is None for t in times) else max(t for t in times if t)


class SteadySale:
    """`shoppers` loops, each: reserve one unit, then buy it, cancel it or let it expire,
    pause, again. Every outcome and attempt is kept for the drill to examine."""

    def __init__(self, shop: Shop, product_id: int, *, shoppers: int = 12) -> None:
        self.shop = shop
        self.product_id = product_id
        self.outcomes: list[Outcome] = []
        self.finishes: list[Attempt] = []
        # Shoppers still on a step when `stop`'s time ran out, and cancelled: a reservation
        # so stopped is marked `Outcome.cancelled` (in `Shop.reservations`, not `outcomes`).
        self.cut_short = 0
        self._stopping = False
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(shoppers)]

    async def _loop(self) -> None:
        while not self._stopping:
            outcome = await self.shop.reserve(self.product_id, patience=30)
            self.outcomes.append(outcome)
            if outcome.hold is not None:
                action = random.choices(["complete", "cancel", "expire"], [4, 2, 4])[0]
                if action != "expire":
                    self.finishes.append(await self.shop.finish(outcome.hold["id"], action))
            await asyncio.sleep(random.uniform(0.02, 0.08))

    async def stop(self, within: float = 60.0) -> None:
        """Stop taking new steps; let each shopper finish the step it is on (so that every
        hold made is one a shopper was told of)."""
        self._stopping = True
        _, pending = await asyncio.wait(self._tasks, timeout=within)
        self.cut_short = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def held(self) -> Iterable[str]:
        return (o.hold["id"] for o in self.outcomes if o.hold is not None)
