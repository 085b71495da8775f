"""Never oversell, never leak: the promises under real concurrency, across real processes.

Two uvicorn processes and a worker (the Procfile's commands) share one database, SQLite or
PostgreSQL; a thousand shoppers click at once. One service and database of each kind serve
the whole module: each storm has products of its own.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import Service, running
from server.domain.clock import now_ms
from server.domain.model import Reservation, Status
from server.service.expiry import Expirer
from server.storage.database import Store
from tests.conftest import run_apart
from tests.pgpool import PostgresDatabases
from tests.support import assert_invariant, assert_reconciled, hold, make_product, reservation

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
async def books_reconcile_after(store: Store) -> AsyncIterator[None]:
    """After every storm, the stock ledger still adds up, product by product (issue 12)."""
    yield
    await assert_reconciled(store)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database of each kind for the whole module (conftest's, made for each test, with
    a service started for each, cost every storm a start and a stop of two web processes and
    a worker): each storm makes products of its own and checks only those, and the books
    are checked whole after each."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("storm") / "flashsale.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    postgres: PostgresDatabases = request.getfixturevalue("postgres")
    name = run_apart(postgres.database())
    yield postgres.url(name)
    postgres.release(name)


@pytest.fixture(scope="module")
def service(
    database_url: str, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The Procfile's two web processes and worker on the module's database, for every
    storm of the module: none stops or breaks a process."""
    flushed = SyncRedis.from_url(redis_server.url)
    flushed.flushall()  # what earlier tests left (conftest's `redis_url` does this per test)
    flushed.close()
    logs = tmp_path_factory.mktemp("storm-logs")
    with running(database_url, redis_server.url, logs, web_concurrency=2) as svc:
        yield svc


async def create_product(client: httpx.AsyncClient, service: Service, stock: int) -> dict[str, Any]:
    response = await client.post(
        "/api/admin/products",
        json={"name": "Storm", "price": 99, "stock": stock},
        headers=service.admin_headers(),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def storm(
    client: httpx.AsyncClient,
    requests: list[dict[str, Any]],
    headers: list[dict[str, str]] | None = None,
) -> list[httpx.Response]:
    """All requests at once, each on its own connection."""
    headers = headers or [{}] * len(requests)
    return await asyncio.gather(
        *(
            client.post("/api/reservations", json=body, headers=h)
            for body, h in zip(requests, headers, strict=True)
        )
    )


def storm_client(service: Service) -> httpx.AsyncClient:
    return service.client(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0))


async def test_a_thousand_shoppers_for_fifty_units(service: Service, store: Store) -> None:
    async with storm_client(service) as client:
        product = await create_product(client, service, 50)
        responses = await storm(client, [{"productId": product["id"], "quantity": 1}] * 1000)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 50, 409: 950}, statuses
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"insufficient_stock"}
    assert len({r.json()["id"] for r in responses if r.status_code == 201}) == 50
    s = await assert_invariant(store, product["id"])
    assert (s.available, s.held, s.sold) == (0, 50, 0)


async def test_a_storm_of_random_quantities_never_oversells(service: Service, store: Store) -> None:
    rng = random.Random(7)
    quantities = [rng.randint(1, 5) for _ in range(1000)]
    async with storm_client(service) as client:
        product = await create_product(client, service, 50)
        responses = await storm(
            client, [{"productId": product["id"], "quantity": q} for q in quantities]
        )
    assert not [r for r in responses if r.status_code >= 500]
    granted = [q for q, r in zip(quantities, responses, strict=True) if r.status_code == 201]
    refused = [q for q, r in zip(quantities, responses, strict=True) if r.status_code == 409]
    assert len(granted) + len(refused) == 1000
    s = await assert_invariant(store, product["id"])
    assert s.held == sum(granted) == 50 - s.available
    # Stock only fell during the storm, so every refused request found less than it asked
    # for, and so does the end state: nothing that would have fit was refused.
    assert s.available < min(refused)


async def test_one_idempotency_key_across_processes_makes_one_hold(
    service: Service, store: Store
) -> None:
    async with storm_client(service) as client:
        product = await create_product(client, service, 10)
        body = {"productId": product["id"], "quantity": 3}
        responses = await storm(client, [body] * 40, [{"Idempotency-Key": "one-click"}] * 40)
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    s = await assert_invariant(store, product["id"])
    assert s.held == 3


async def test_every_response_carries_the_server_time(service: Service) -> None:
    async with service.client() as client:
        for path in ("/api/products", "/api/products/999999", "/healthz"):
            response = await client.get(path)
            served = parsedate_to_datetime(response.headers["date"]).timestamp() * 1000
            assert abs(served - now_ms()) < 5_000


async def test_complete_racing_expiry_ends_one_way_or_the_other(
    service: Service, store: Store
) -> None:
    """Complete (through the web processes) and expire (a shop of the test's own, as a
    worker) fire at the same instant, 300 times: each hold ends COMPLETED with its units
    sold, or EXPIRED with its units back, never both, never neither; and never completed
    at or after its expiresAt.

    Ten lanes run thirty rounds each: a hold falls due 40 ms ahead, the complete is aimed at
    that instant give or take 15 ms, and the expirer fires at it. On a busy machine a request
    may take longer than that to arrive, and making the hold longer than 40 ms, so that every
    complete would come too late and the race would not be run: each lane aims by a
    staircase (10 ms earlier after a complete that lost, 10 ms later after one that won,
    so it settles where the two meet), and falls due at least twice as far ahead as making
    its last hold took."""
    lanes, rounds = 10, 30
    product = await make_product(store, lanes * rounds)
    expirer = Expirer(store, publish=lambda events: None)
    rng = random.Random(11)

    async def at(ms: int) -> None:
        await asyncio.sleep(max(0, ms - now_ms()) / 1000)  # timing the collision

    async def lane(client: httpx.AsyncClient) -> list[tuple[Reservation, int]]:
        results = []
        lead, offset = 40, 0  # ms: how far ahead a hold falls due; the aim against it
        for _ in range(rounds):
            started = now_ms()
            due = started + lead
            held = await hold(store, product.id, 1, now=due - 1_000, hold_ms=1_000)
            lead = max(40, 2 * (now_ms() - started))
            aim = due + offset + rng.randint(-15, 15)

            async def complete(reservation_id: str = held.id, aim: int = aim) -> int:
                await at(aim)
                response = await client.post(f"/api/reservations/{reservation_id}/complete")
                assert response.status_code in (200, 409), response.text
                if response.status_code == 409:
                    assert "expired" in response.json()["message"]
                return response.status_code

            async def expire(due: int = due) -> None:
                await at(due)
                await expirer.expire_overdue()

            status, _ = await asyncio.gather(complete(), expire())
            results.append((held, status))
            offset += 10 if status == 200 else -10
        return results

    async with service.client(limits=httpx.Limits(max_keepalive_connections=lanes)) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(lanes)))
        outcomes = [
            r for done in await asyncio.gather(*(lane(client) for _ in range(lanes))) for r in done
        ]

    await expirer.expire_overdue()  # anything the lanes' expirers did not reach
    answers = Counter(status for _, status in outcomes)
    for held, status in outcomes:
        final = await reservation(store, held.id)
        assert final.status is (Status.COMPLETED if status == 200 else Status.EXPIRED)
        if status == 200:
            assert final.completed_at is not None
            assert final.completed_at < held.expires_at
    s = await assert_invariant(store, product.id)
    assert (s.sold, s.expired, s.held) == (answers[200], answers[409], 0)
    assert s.available == answers[409]
    # Both sides won some: the race was run, not avoided.
    assert answers[200] > 0
    assert answers[409] > 0
