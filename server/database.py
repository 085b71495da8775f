"""How a process reaches the database: `databases`, one SQL dialect, SQLite or PostgreSQL.

`databases` opens a fresh aiosqlite connection (and thread) for every acquire on SQLite, which
costs more than the transaction itself (PITFALLS.md). So on SQLite this module holds its
connections for the life of the process: one writer, used by one transaction at a time, and
a few readers (WAL lets them read while the writer writes). On PostgreSQL the asyncpg pool
already keeps connections, and replaces broken ones, so each unit of work borrows one.

Writes are serialised per process: SQLite takes one writer at a time anyway, and a queue in
the process is far cheaper than several connections sleeping in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from databases import Database, DatabaseURL
from databases.core import Connection

from server.errors import DatabaseBusy, DatabaseUnavailable
from server.model import Row

logger = logging.getLogger(__name__)

Values = Mapping[str, Any]

SQLITE_READERS = 2


def sqlite_connection_class(busy_timeout_ms: int) -> type[sqlite3.Connection]:
    """A `sqlite3.Connection` that sets its PRAGMAs itself, since they are per connection."""

    class FlashSaleSQLite(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            # WAL + NORMAL: a crash of the process loses nothing; a power cut may lose the
            # last transactions, each whole (a hold and its stock change go together).
            self.execute("PRAGMA synchronous = NORMAL")
            self.execute("PRAGMA foreign_keys = ON")

    return FlashSaleSQLite


def sqlite_path(url: str) -> Path:
    return Path(DatabaseURL(url).database)


class Store:
    """The database of one process. Connect in the lifespan, close in reverse order."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 5_000, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = sqlite_path(url)
            if str(path) in ("", ":memory:"):
                raise ValueError("SQLite needs a file: every connection to :memory: is empty")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = Database(url, factory=sqlite_connection_class(busy_timeout_ms))
        else:
            # lock_timeout plays the part of SQLite's busy timeout: a row held by someone
            # else's long transaction makes us answer 503 instead of hanging.
            self._db = Database(
                url,
                min_size=1,
                max_size=pool_size,
                server_settings={"lock_timeout": f"{int(busy_timeout_ms)}ms"},
            )
        self._write_lock = asyncio.Lock()
        self._writer: Connection | None = None
        self._readers: list[Connection] = []
        self._next_reader = itertools.cycle(range(SQLITE_READERS))

    async def connect(self) -> None:
        try:
            await self._db.connect()
            if self.is_sqlite:
                self._writer = await self._open()
                # WAL persists in the file; setting it here makes any fresh file right.
                await self._writer.execute("PRAGMA journal_mode = WAL")
                self._readers = [await self._open() for _ in range(SQLITE_READERS)]
        except (OSError, asyncpg.PostgresError, sqlite3.Error) as exc:
            await self.close()
            raise DatabaseUnavailable(str(exc)) from exc

    async def close(self) -> None:
        for conn in [*self._readers, self._writer]:
            if conn is not None:
                await conn.__aexit__()
        self._readers, self._writer = [], None
        await self._db.disconnect()

    async def _open(self) -> Connection:
        # A Connection of our own, not the per-task one `Database.connection()` hands out,
        # so that it outlives the task that opened it.
        conn = Connection(self._db, self._db._backend)
        await conn.__aenter__()
        return conn

    @asynccontextmanager
    async def _borrow(self, held: Connection | None) -> AsyncIterator[Connection]:
        if held is not None:
            yield held
            return
        async with Connection(self._db, self._db._backend) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """One write transaction at a time per process; commits on success.

        On SQLite it begins IMMEDIATE, taking the write lock first, so that nothing inside
        can fail on a lock upgrade; a lock not obtained within the busy timeout raises
        `DatabaseBusy` with nothing changed.
        """
        async with self._write_lock, _translated_errors(), self._borrow(self._writer) as conn:
            if not self.is_sqlite:
                async with conn.transaction():
                    yield conn
                return
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Connection]:
        """A connection for reads outside any write transaction."""
        held = self._readers[next(self._next_reader)] if self._readers else None
        async with _translated_errors(), self._borrow(held) as conn:
            yield conn

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        async with self.reader() as conn:
            return await conn.fetch_all(sql, dict(values or {}))

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        async with self.reader() as conn:
            return await conn.fetch_one(sql, dict(values or {}))

    async def ping(self) -> None:
        await self.fetch_one("SELECT 1 AS ok")


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    """Driver errors that mean "not now" become domain errors the API answers with 503."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise DatabaseBusy("the database is busy") from exc
        raise
    except (
        asyncpg.exceptions.LockNotAvailableError,
        asyncpg.exceptions.DeadlockDetectedError,
        asyncpg.exceptions.SerializationError,
        asyncpg.exceptions.QueryCanceledError,
    ) as exc:
        raise DatabaseBusy("the database is busy") from exc
    except (
        OSError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.InterfaceError,
    ) as exc:
        raise DatabaseUnavailable(str(exc)) from exc
