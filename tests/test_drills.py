"""Fault drills and graceful shutdown, on the real stack: the Procfile's processes, a real
Redis, a real worker, a real database file (or PostgreSQL).

Each drill breaks something on purpose in the middle of work (a web process or the worker
killed with SIGKILL, Redis stopped, the database's write lock taken from outside, too many
requests at once, SIGTERM) and then checks the promises: nothing half-written, every 201
is a hold that exists, `available + held + sold == total`, every overdue hold expired once,
and an answer, never a hang. Drills wait on the event they need with a deadline, never sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic_core import from_json
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import Process, Service, running
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import HoldRequest
from server.infra.keys import HEALTH_CHECK_KEY, expire_due_job_id
from server.infra.redis_client import redis_client
from server.service.expiry import ExpiryScheduler, due_time
from server.storage.database import Store
from tests.events import FrameLog
from tests.support import (
    assert_invariant,
    eventually,
    make_product,
    write_lock_held_elsewhere,
)

pytestmark = pytest.mark.slow

Body = dict[str, Any]


# -- helpers -------------------------------------------------------------------------------


def storm_client(service: Service, connections: int = 100) -> httpx.AsyncClient:
    """A new connection per request, so that requests spread over every web process."""
    return service.client(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    )


async def reserve(client: httpx.AsyncClient, product_id: int, quantity: int = 1) -> httpx.Response:
    return await client.post(
        "/api/reservations", json={"productId": product_id, "quantity": quantity}
    )


async def holds_by_status(store: Store, product_id: int) -> dict[str, str]:
    """Every hold of the product, from the database: id → status."""
    async with store.reader() as conn:
        rows = await conn.fetch_all(
            "SELECT id, status FROM reservations WHERE product_id = :p", {"p": product_id}
        )
    return {str(row["id"]): str(row["status"]) for row in rows}


async def count_status(store: Store, product_id: int, status: str) -> int:
    async with store.reader() as conn:
        row = await conn.fetch_one(
            "SELECT COUNT(*) AS n FROM reservations WHERE product_id = :p AND status = :s",
            {"p": product_id, "s": status},
        )
    assert row is not None
    return int(row["n"])


async def admin_stats(service: Service, product_id: int) -> Body:
    async with service.client() as client:
        response = await client.get(
            f"/api/admin/products/{product_id}/stats", headers=service.admin_headers()
        )
    assert response.status_code == 200, response.text
    body: Body = response.json()
    assert body["available"] >= 0, body
    assert body["available"] + body["held"] + body["sold"] == body["total"], body
    return body


def web_workers(service: Service) -> list[int]:
    """uvicorn's worker processes under its supervisor (not any helper process it has)."""
    workers = []
    for pid in service.web.children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(pid)
    return workers


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus' text format (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            total += float(value)
    return total


BUSY_RETRIES = ("flashsale_database_busy_total", 'result="retry"')


async def web_busy_retries(service: Service) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(service.metrics_url)
    return metric(response.text, *BUSY_RETRIES)


async def worker_busy_retries(service: Service) -> float:
    port = service.worker.env["WORKER_METRICS_PORT"]
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    return metric(response.text, *BUSY_RETRIES)


async def until(check: Callable[[], Awaitable[Any]], what: str, within: float = 15.0) -> Any:
    return await eventually(check, within=within, what=what)


async def worker_up(service: Service, redis_url: str) -> None:
    """Until the worker's arq loop runs (it writes its health key on its first poll)."""
    redis = Redis.from_url(redis_url)
    try:

        async def healthy() -> bool:
            if not service.worker.running:
                raise AssertionError(f"the worker exited:\n{service.logs()}")
            return bool(await redis.exists(HEALTH_CHECK_KEY))

        await until(healthy, "the worker to start")
    finally:
        await redis.aclose()


async def write_wave(
    store: Store, redis_url: str, product_id: int, *, groups: int, per_group: int, first_due: int,
    spacing_ms: int, bucket_ms: int = 100, schedule: bool = True,
) -> list[int]:  # fmt: skip
    """`groups * per_group` holds of one unit, each group due `spacing_ms` after the one
    before, written straight to the database; their expiry jobs enqueued as a web process
    would (as bench/wave.py does). Returns the due times."""
    hold_ms = 60_000
    dues = [first_due + group * spacing_ms for group in range(groups)]
    for due in dues:
        requests = [HoldRequest(product_id, 1)] * per_group
        await store.write(
            lambda conn, due=due, requests=requests: inventory.reserve(  # type: ignore[misc]
                conn, requests, now=due - hold_ms, hold_ms=hold_ms
            )
        )
    if not schedule:
        return dues
    redis = redis_client(redis_url)
    scheduler = ExpiryScheduler(redis, bucket_ms=bucket_ms)
    scheduler.start()
    try:
        scheduler.schedule(dues)
        await scheduler.wait_idle()
        assert scheduler.failures == 0
    finally:
        await scheduler.stop()
        await redis.aclose()
    assert now_ms() < first_due, "the wave was written too slowly to be a drill"
    return dues


class Socket:
    """A /ws client that collects every frame, and how the server closed it."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames = FrameLog()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.connection:
                await self.frames.add(from_json(message))
        except ConnectionClosed:
            pass

    async def closed(self, within: float = 15.0) -> int | None:
        await asyncio.wait_for(self.connection.wait_closed(), within)
        await self._reader
        return self.connection.close_code

    async def close(self) -> None:
        await self.connection.close()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def socket_to(service: Service) -> AsyncIterator[Socket]:
    url = service.base_url.replace("http://", "ws://") + "/ws"
    async with connect(url, open_timeout=10) as connection:
        client = Socket(connection)
        try:
            await client.frames.wait_for(lambda f: f["type"] == "snapshot")
            yield client
        finally:
            await client.close()


async def logged(process: Process, text: str) -> bool:
    return text in process.log.read_text()


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@contextmanager
def stopped_on_exit(process: Process) -> Iterator[Process]:
    try:
        yield process
    finally:
        process.stop()


class Storm:
    """`lanes` shoppers reserving one unit each, again and again, until stopped; every
    answer (or transport error) recorded, in order."""

    def __init__(self, client: httpx.AsyncClient, product_id: int, lanes: int) -> None:
        self.client = client
        self.product_id = product_id
        self.responses: list[httpx.Response] = []
        self.transport_errors: list[httpx.TransportError] = []
        self._progress = asyncio.Condition()
        self._stop = asyncio.Event()
        self._lanes = [asyncio.create_task(self._lane()) for _ in range(lanes)]

    @property
    def answered(self) -> int:
        return len(self.responses) + len(self.transport_errors)

    async def _lane(self) -> None:
        while not self._stop.is_set():
            try:
                response = await reserve(self.client, self.product_id)
            except httpx.TransportError as exc:
                self.transport_errors.append(exc)
            else:
                self.responses.append(response)
            async with self._progress:
                self._progress.notify_all()

    async def wait_answered(self, count: int, within: float = 30.0) -> None:
        """Until `count` more requests have been answered from now."""
        target = self.answered + count
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self.answered >= target), within
                )
            except TimeoutError:
                raise AssertionError(
                    f"the storm got {self.answered} of {target} answers within {within} s"
                ) from None

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._lanes)


# -- 1. a web process killed in the middle of a storm --------------------------------------


async def test_a_web_process_killed_mid_storm_leaves_no_half_written_hold(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    with running(database_url, redis_url, tmp_path / "logs", web_concurrency=2) as service:

        async def two_workers(but_not: int = 0) -> list[int] | None:
            found = web_workers(service)
            return found if len(found) == 2 and but_not not in found else None

        workers: list[int] = await until(two_workers, "uvicorn's two workers")
        product = await service.new_product(100_000)
        async with storm_client(service) as client:
            storm = Storm(client, product["id"], lanes=40)
            try:
                await storm.wait_answered(300)
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
                await storm.wait_answered(300)  # the other process carries on meanwhile
            finally:
                await storm.stop()

            # uvicorn's supervisor starts a new worker in its place...
            await until(lambda: two_workers(but_not=victim), "a new worker in its place")
            # ...and the service answers as before.
            after = await asyncio.gather(*(reserve(client, product["id"]) for _ in range(20)))
            assert {r.status_code for r in after} == {201}, [r.text for r in after]

        statuses = Counter(r.status_code for r in storm.responses)
        assert set(statuses) == {201}, (statuses, [r.text for r in storm.responses if r.is_error])
        granted = {r.json()["id"] for r in [*storm.responses, *after]}
        assert len(granted) == len(storm.responses) + len(after), "an id was given twice"

        # Every 201 is a hold that exists; every hold is a 201 or a request whose connection
        # died with the process (its client cannot know whether it was made).
        in_database = await holds_by_status(store, product["id"])
        assert granted <= set(in_database), granted - set(in_database)
        assert set(in_database.values()) == {"ACTIVE"}
        assert len(in_database) - len(granted) <= len(storm.transport_errors)

        stats = await admin_stats(service, product["id"])
        s = await assert_invariant(store, product["id"])
        assert s.held == stats["held"] == len(in_database)
        assert s.available == 100_000 - len(in_database)


# -- 2. the worker killed in the middle of an expiry wave ----------------------------------


async def test_a_worker_killed_mid_wave_leaves_every_hold_expired_exactly_once(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    """3,000 holds fall due over 3 s, a job per 100 ms; the worker is killed as soon as
    the first are expired. A new worker finishes the wave: every hold EXPIRED, every unit
    back once. (Both its runs failed in a fresh clone's suite at a load average of 23, the
    run stopped before pytest said why: a wave of 1.2 s can end before a busy test sees it
    begin, and a new worker's start alone can take over 30 s there. The wave and the
    deadline are long enough for a busy machine now.)"""
    holds = 3_000
    service = Service(database_url, redis_url, tmp_path / "logs", SWEEP_SECONDS="1")
    with stopped_on_exit(service.worker) as worker:
        worker.start()
        await worker_up(service, redis_url)
        product = await make_product(store, holds)
        await write_wave(
            store, redis_url, product.id, groups=60, per_group=holds // 60,
            first_due=now_ms() + 2_000, spacing_ms=50,
        )  # fmt: skip

        async def expiring() -> int:
            return await count_status(store, product.id, "EXPIRED")

        await until(expiring, "the wave to begin", within=30)
        worker.kill()
        expired_at_kill = await expiring()
        assert 0 < expired_at_kill < holds, "the kill did not land in the middle of the wave"
        # Whatever the kill interrupted was one transaction: committed whole, or not at all.
        s = await assert_invariant(store, product.id)
        assert (s.expired, s.held, s.available) == (
            expired_at_kill,
            holds - expired_at_kill,
            expired_at_kill,
        )

        worker.start()

        async def all_expired() -> bool:
            return await expiring() == holds

        await until(all_expired, "a new worker to finish the wave", within=120)
        s = await assert_invariant(store, product.id)
        assert (s.available, s.held, s.expired, s.total) == (holds, 0, holds, holds)
        assert set((await holds_by_status(store, product.id)).values()) == {"EXPIRED"}


# -- 3. Redis stopped and started again in the middle of a storm ---------------------------


async def test_a_redis_restart_mid_storm_loses_no_hold_and_everything_recovers(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path, store: Store
) -> None:
    """Reservations go on committing while Redis is away (their expiry jobs and events are
    lost); once it is back, the sweeper expires every hold and the sockets are live again."""
    stock = 100_000
    with (
        running(
            database_url, own_redis.url, tmp_path / "logs",
            web_concurrency=2, HOLD_SECONDS="2", SWEEP_SECONDS="1",
        ) as service,
        stopped_on_exit(service.worker),
    ):  # fmt: skip
        product = await service.new_product(stock)
        async with socket_to(service) as ws, storm_client(service) as client:
            storm = Storm(client, product["id"], lanes=20)
            try:
                await storm.wait_answered(200)
                await asyncio.to_thread(own_redis.stop)
                during_outage = len(storm.responses)
                await storm.wait_answered(300)
                in_outage = storm.responses[during_outage:]
                await asyncio.to_thread(own_redis.start)
                await storm.wait_answered(200)
            finally:
                await storm.stop()

            assert not storm.transport_errors, storm.transport_errors
            for response in storm.responses:
                assert response.status_code == 201 or (
                    response.status_code in (409, 503)
                    and response.json()["statusCode"] == response.status_code
                    and response.json()["code"]
                ), response.text
            assert sum(r.status_code == 201 for r in in_outage) > 0, "nothing committed"

            # Live again: a change made now reaches the socket opened before the outage.
            fresh = await reserve(client, product["id"])
            assert fresh.status_code == 201, fresh.text
            version = fresh.json()["product"]["version"]
            await ws.frames.wait_for(
                lambda f: (
                    f["type"] == "stock"
                    and f["productId"] == product["id"]
                    and f["version"] >= version
                ),
                within=20,
            )

        granted = {r.json()["id"] for r in storm.responses if r.status_code == 201}
        granted.add(fresh.json()["id"])
        in_database = await holds_by_status(store, product["id"])
        # Every 201 is a hold, and every hold was a 201: nothing half-done either way.
        assert set(in_database) == granted

        # Expiry recovers by itself: every hold, including those whose job was never
        # enqueued, ends EXPIRED with its units back.
        async def all_back() -> bool:
            s = await assert_invariant(store, product["id"])
            return s.available == stock

        await until(all_back, "every hold to expire after the outage", within=30)
        assert set((await holds_by_status(store, product["id"])).values()) == {"EXPIRED"}
        s = await assert_invariant(store, product["id"])
        assert s.expired == len(granted)


# -- 4. the database held by a long write transaction from outside -------------------------

BUSY_TIMEOUT_MS = 500


async def test_a_database_held_from_outside_answers_503_in_time_then_serves_again(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    with running(
        database_url, redis_url, tmp_path / "logs", worker=False,
        web_concurrency=1, DB_BUSY_TIMEOUT_MS=str(BUSY_TIMEOUT_MS),
    ) as service:  # fmt: skip
        product = await service.new_product(10)
        async with service.client() as client:
            async with write_lock_held_elsewhere(database_url, product["id"]):
                started = time.monotonic()
                refused = await asyncio.gather(*(reserve(client, product["id"]) for _ in range(3)))
                waited = time.monotonic() - started
                listed = await client.get("/api/products")  # reading needs no write lock

            for response in refused:
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "database_busy"
                assert response.headers["retry-after"].isdigit()
            # Within the busy timeout, with a generous margin for a loaded machine: not a hang.
            assert waited < BUSY_TIMEOUT_MS / 1000 + 4.5, waited
            assert listed.status_code == 200
            s = await assert_invariant(store, product["id"])
            assert (s.available, s.held) == (10, 0), "a refused request changed something"

            # Released: the same request succeeds.
            held = await reserve(client, product["id"], 2)
            assert held.status_code == 201, held.text
        s = await assert_invariant(store, product["id"])
        assert (s.available, s.held) == (8, 2)


# -- 5. the overload limit -----------------------------------------------------------------


async def test_past_the_in_flight_limit_requests_get_503_at_once_and_health_is_answered(
    tmp_path: Path, redis_url: str, store: Store
) -> None:
    """MAX_IN_FLIGHT=4, and the database's write lock held from outside, so that the
    admitted reservations stay in flight: the others are refused at once, /healthz is
    still answered, and the admitted ones succeed once the lock is released."""
    limit, fired = 4, 24
    with running(
        store.url, redis_url, tmp_path / "logs", worker=False,
        web_concurrency=1, MAX_IN_FLIGHT=str(limit), DB_BUSY_TIMEOUT_MS="15000",
    ) as service:  # fmt: skip
        product = await service.new_product(100)
        async with storm_client(service) as client:
            async with write_lock_held_elsewhere(store.url, product["id"]):
                requests = [
                    asyncio.create_task(reserve(client, product["id"])) for _ in range(fired)
                ]
                pending = set(requests)
                refused: list[httpx.Response] = []
                while len(refused) < fired - limit:
                    done, pending = await asyncio.wait(
                        pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
                    )
                    assert done, f"only {len(refused)} answers while the lock was held"
                    refused.extend(task.result() for task in done)
                # The admitted ones wait on the lock; the rest were answered meanwhile.
                assert len(pending) == limit
                for response in refused:
                    assert response.status_code == 503, response.text
                    assert response.json()["code"] == "overloaded"
                    assert response.headers["retry-after"].isdigit()
                    assert response.headers["x-request-id"]  # refused, but still traceable
                # Still at the limit: health is answered, anything else refused.
                for path in ("/healthz", "/readyz"):
                    assert (await client.get(path)).status_code == 200, path
                listing = await client.get("/api/products")
                assert listing.status_code == 503
                assert listing.json()["code"] == "overloaded"

            admitted = await asyncio.gather(*pending)
            assert [r.status_code for r in admitted] == [201] * limit, [r.text for r in admitted]
            assert (await client.get("/api/products")).status_code == 200
        s = await assert_invariant(store, product["id"])
        assert s.held == limit


# -- 6. graceful shutdown ------------------------------------------------------------------


SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@asynccontextmanager
async def sigterm_with_a_request_in_flight(
    service: Service, database_url: str, product_id: int
) -> AsyncIterator[asyncio.Task[httpx.Response]]:
    """A reservation waiting on the write lock (held from outside) when web gets SIGTERM;
    the block runs while uvicorn waits for it, and the lock is released when it ends."""
    baseline = await web_busy_retries(service)
    async with service.client() as client:
        async with write_lock_held_elsewhere(database_url, product_id):
            in_flight = asyncio.create_task(reserve(client, product_id, 3))

            async def waiting_on_the_lock() -> bool:
                return await web_busy_retries(service) > baseline

            await until(waiting_on_the_lock, "the reservation to wait on the write lock")
            service.web.signal(signal.SIGTERM)
            await until(
                lambda: logged(service.web, "Waiting for connections to close"),
                "the server to wait for the request in flight",
            )
            assert not in_flight.done()
            yield in_flight
        await asyncio.wait([in_flight], timeout=30)  # the client stays open meanwhile


def new_connection_outcome(port: int, within: float) -> str:
    """ "refused", "answered" or "hung": what a new client meets."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: drill\r\n\r\n")
            return "answered" if sock.recv(1) else "refused"
    except (ConnectionRefusedError, ConnectionResetError):
        return "refused"
    except TimeoutError:
        return "hung"


@SQLITE_ONLY
# With two, uvicorn's own supervisor would hold the socket open while its workers drain
# (server/web.py).
@pytest.mark.parametrize("web_concurrency", [1, 2])
async def test_on_sigterm_web_refuses_new_connections_finishes_the_request_in_flight_and_exits(
    tmp_path: Path, redis_url: str, store: Store, web_concurrency: int
) -> None:
    """One SIGTERM, two promises: while web drains, a new client is refused at once (not
    left hanging), and the request in flight gets its answer before web exits. (They were
    two tests, each starting web and sending SIGTERM with a request in flight.)"""
    with running(
        store.url, redis_url, tmp_path / "logs", worker=False,
        web_concurrency=web_concurrency, DB_BUSY_TIMEOUT_MS="15000",
    ) as service:  # fmt: skip
        product = await service.new_product(10)
        async with sigterm_with_a_request_in_flight(service, store.url, product["id"]) as request:
            # While it drains, a new client is refused at once (and can go elsewhere).
            outcome = await asyncio.to_thread(new_connection_outcome, service.port, 3.0)
        assert outcome == "refused"
        # Released: the request in flight gets its proper answer...
        response = request.result()
        assert response.status_code == 201, response.text
        # ...and the process ends once its lifespan has closed everything. uvicorn re-raises
        # the signal it stopped on, so that the parent sees why it ended: -SIGTERM, not 0.
        code = await asyncio.to_thread(service.web.wait, 15)
        assert code in (0, -signal.SIGTERM), service.logs()
        log = service.web.log.read_text()
        assert log.count("Application shutdown complete") == web_concurrency
        assert "Traceback" not in log, log
    held = await holds_by_status(store, product["id"])
    assert held == {response.json()["id"]: "ACTIVE"}
    s = await assert_invariant(store, product["id"])
    assert (s.available, s.held) == (7, 3)


@SQLITE_ONLY
@pytest.mark.parametrize("web_concurrency", [1, 2])
async def test_on_sigterm_open_sockets_are_closed_with_1001(
    database_url: str, redis_url: str, tmp_path: Path, web_concurrency: int
) -> None:
    with running(
        database_url, redis_url, tmp_path / "logs", worker=False, web_concurrency=web_concurrency
    ) as service:
        async with AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(socket_to(service)) for _ in range(4)]
            service.web.signal(signal.SIGTERM)
            codes = await asyncio.gather(*(ws.closed() for ws in sockets))
        assert codes == [1001] * len(sockets)
        code = await asyncio.to_thread(service.web.wait, 15)
        assert code in (0, -signal.SIGTERM), service.logs()


@SQLITE_ONLY
async def test_on_sigterm_the_worker_finishes_the_job_in_hand(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    """A hold's expiry job is in hand (arq marked it in progress), waiting on the write lock
    held from outside, when the worker gets SIGTERM: it takes no new job, finishes that one
    (every hold due expired, its units back) and exits 0."""
    holds = 500
    service = Service(
        database_url, redis_url, tmp_path / "logs", DB_BUSY_TIMEOUT_MS="15000", LOG_LEVEL="INFO"
    )
    redis = Redis.from_url(redis_url)
    with stopped_on_exit(service.worker) as worker:
        worker.start()
        await worker_up(service, redis_url)
        product = await make_product(store, holds)
        (due,) = await write_wave(
            store, redis_url, product.id, groups=1, per_group=holds,
            # Time to write them and take the lock before they fall due, on a busy machine too.
            first_due=now_ms() + 3_000, spacing_ms=0,
        )  # fmt: skip
        baseline = await worker_busy_retries(service)
        in_progress = f"arq:in-progress:{expire_due_job_id(due_time(due, 100))}"
        async with write_lock_held_elsewhere(database_url, product.id):

            async def job_waiting_on_the_lock() -> bool:
                return bool(
                    await redis.exists(in_progress)
                    and await worker_busy_retries(service) > baseline
                )

            await until(job_waiting_on_the_lock, "the expiry job to wait on the write lock")
            assert await count_status(store, product.id, "ACTIVE") == holds
            worker.signal(signal.SIGTERM)
            await until(
                lambda: logged(worker, "stopping: finishing"), "the worker to begin stopping"
            )
        code = await asyncio.to_thread(worker.wait, 20)
        assert code == 0, service.logs()
    await redis.aclose()
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (holds, 0, holds), service.logs()
    assert set((await holds_by_status(store, product.id)).values()) == {"EXPIRED"}
