"""Shared fixtures: a Redis of the tests' own, and a clean database per test on both backends.

PostgreSQL comes from TEST_POSTGRES_URL (default: the local server's `test` database, used
only to create and drop each test process' few databases: tests/pgpool.py). Where it is
unreachable the PostgreSQL tests are skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright
from redis.asyncio import Redis

from server.devtools.embedded_redis import EmbeddedRedis
from server.domain.model import Event
from server.service.shop import Shop
from server.storage import migrate
from server.storage.database import Store
from tests.pgpool import PostgresDatabases
from tests.receiver import Receiver

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
def postgres(pytestconfig: pytest.Config) -> PostgresDatabases:
    problem = _postgres_available()
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI must run the PostgreSQL tests)")
        pytest.skip(problem)
    databases = PostgresDatabases(POSTGRES_ADMIN_URL)
    # Closed as pytest ends, not in the teardown of the session's last test, and closing
    # leaves the drops to the pool's watchdog (tests/pgpool.py): drops wait for checkpoints.
    pytestconfig.add_cleanup(databases.close)
    databases.setup()
    return databases


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per test process, which `database_url` copies for each
    test: migrating a fresh file took ~0.15 s a test (17 migrations, each committed with an
    fsync), a copy of the closed file (no WAL left beside it) a fraction of a millisecond."""
    path = tmp_path_factory.mktemp("sqlite-template") / "flashsale.db"

    async def make() -> None:
        store = Store(f"sqlite:///{path}")
        await store.connect()
        await migrate.migrate(store)
        await store.close()

    run_apart(make())
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, migrated database: SQLite in a temp file, or PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "flashsale.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    postgres: PostgresDatabases = request.getfixturevalue("postgres")
    name = await postgres.database()
    yield postgres.url(name)
    postgres.release(name)


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


# -- webhooks ------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A shop's webhook receiver on a real server of its own (tests/receiver.py), started
    for this test and stopped after it."""
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


# -- the browser ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the session (starting one costs seconds). Browser tests run on the
    session's event loop: `pytest.mark.asyncio(loop_scope="session")`."""
    from tests import browser

    problem = browser.missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI must run the browser tests)")
        pytest.skip(problem)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=browser.CHROMIUM, args=browser.CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="session")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The session's Chromium; every context a test opens in it is closed after the test."""
    yield chromium
    for context in chromium.contexts:
        await context.close()
