"""Shared fixtures: a Redis of the tests' own, and a fresh database per test on both backends.

PostgreSQL comes from TEST_POSTGRES_URL (default: the local server's `test` database, used
only to create and drop one database per test). Where it is unreachable the PostgreSQL tests
are skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from redis.asyncio import Redis

from server import migrate
from server.database import Store
from server.embedded_redis import EmbeddedRedis
from server.model import Event
from server.shop import Shop

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = TypeVar("T")


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis) -> str:
    """The shared test Redis, emptied for this test."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis for this test alone, which it may stop, kill and restart."""
    server = EmbeddedRedis(tmp_path / "own-redis", persist=False)
    server.start()
    yield server
    server.stop()


# -- databases -----------------------------------------------------------------------------


class PostgresDatabases:
    """Creates a database per test from a template migrated once per session."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"flashsale_tpl_{secrets.token_hex(4)}"

    def url(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def setup(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        store = Store(self.url(self.template))
        await store.connect()
        try:
            await migrate.migrate(store)
        finally:
            await store.close()

    async def create(self) -> str:
        name = f"flashsale_t_{secrets.token_hex(6)}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    async def drop(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_apart(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a thread of its own, whatever loop is running here
    (session fixtures can be set up from inside a test's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _postgres_available() -> str | None:
    async def probe() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
        await conn.close()

    try:
        run_apart(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {exc}"
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    problem = _postgres_available()
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI must run the PostgreSQL tests)")
        pytest.skip(problem)
    databases = PostgresDatabases(POSTGRES_ADMIN_URL)
    run_apart(databases.setup())
    yield databases
    run_apart(databases.drop(databases.template))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, migrated database: SQLite in a temp file, or PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'flashsale.db'}"
        store = Store(url)
        await store.connect()
        await migrate.migrate(store)
        await store.close()
        yield url
        return
    postgres: PostgresDatabases = request.getfixturevalue("postgres")
    name = await postgres.create()
    yield postgres.url(name)
    await postgres.drop(name)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url, busy_timeout_ms=5_000)
    await store.connect()
    yield store
    await store.close()


class Published(list[Event]):
    """Events handed to the publisher, in order (no Redis involved)."""

    def __call__(self, events: object) -> None:
        self.extend(events)  # type: ignore[arg-type]


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
async def shop(store: Store, published: Published) -> AsyncIterator[Shop]:
    shop = Shop(store, hold_ms=120_000, publish=published)
    await shop.start()
    yield shop
    await shop.stop()
