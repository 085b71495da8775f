"""How a process reaches the database: `databases`, one SQL dialect, SQLite or PostgreSQL.

Two costs measured here shape this module (figures in bench/README.md):

- `databases` opens a fresh aiosqlite connection (and thread) for every acquire on SQLite.
  So on SQLite the connections are held for the life of the process: one writer, used by
  one transaction at a time, and a few readers (WAL lets them read while the writer writes).
  On PostgreSQL the asyncpg pool already keeps connections, and replaces broken ones, so
  each unit of work borrows one.
- Through `databases`' query methods a statement costs three thread hops and a SQLAlchemy
  compile of its text: ~150 µs of event-loop time, ~30 µs more per bound value. On SQLite
  the same SQL text runs through the aiosqlite connection `databases` hands out
  (`Connection.raw_connection`) in one hop with no compile, since sqlite3 binds `:name`
  placeholders itself; that is 5× less per transaction and holds the write lock 4× shorter.
  On PostgreSQL statements go through `databases` as they are.

Either way the domain code sees an `Executor`: `fetch_all`, `fetch_one`, `execute` of
portable SQL with `:name` placeholders.

Writes are serialised per process: SQLite takes one writer at a time anyway, and a queue in
the process is far cheaper than several connections sleeping in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg
from databases import Database, DatabaseURL
from databases.core import Connection

from server.errors import DatabaseBusy, DatabaseUnavailable
from server.model import Row

logger = logging.getLogger(__name__)

Values = Mapping[str, Any]

SQLITE_READERS = 2


class Executor(Protocol):
    """Runs portable SQL (`:name` placeholders) on one connection."""

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]: ...

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None: ...

    async def execute(self, sql: str, values: Values | None = None) -> None: ...


class SQLiteExecutor:
    """Each statement in one hop to the connection's thread, bound by sqlite3 itself."""

    def __init__(self, connection: Connection) -> None:
        self._raw: aiosqlite.Connection = connection.raw_connection
        self._raw.row_factory = sqlite3.Row

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        rows = await self._raw.execute_fetchall(sql, values or {})
        return list(rows)

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        rows = await self.fetch_all(sql, values)
        return rows[0] if rows else None

    async def execute(self, sql: str, values: Values | None = None) -> None:
        await self._raw.execute_fetchall(sql, values or {})


class DatabasesExecutor:
    """Statements through `databases` (PostgreSQL: compiled by SQLAlchemy, run by asyncpg)."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        return await self._conn.fetch_all(sql, dict(values or {}))

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        return await self._conn.fetch_one(sql, dict(values or {}))

    async def execute(self, sql: str, values: Values | None = None) -> None:
        await self._conn.execute(sql, dict(values or {}))


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
            self._db = Database(
                url,
                min_size=1,
                max_size=pool_size,
                server_settings={
                    # Plays the part of SQLite's busy timeout: a row held by someone else's
                    # long transaction makes us answer 503 instead of hanging.
                    "lock_timeout": f"{int(busy_timeout_ms)}ms",
                    # asyncpg prepares every statement; after five runs PostgreSQL may
                    # cache a generic plan made when the tables looked different (the
                    # sweeper's, from an empty table, turned a 15 ms expiry batch into
                    # 250 ms). Our statements plan in a fraction of a millisecond.
                    "plan_cache_mode": "force_custom_plan",
                },
            )
        self._write_lock = asyncio.Lock()
        self._held: list[Connection] = []
        self._writer: SQLiteExecutor | None = None
        self._readers: list[SQLiteExecutor] = []
        self._next_reader = itertools.cycle(range(SQLITE_READERS))

    async def connect(self) -> None:
        try:
            await self._db.connect()
            if self.is_sqlite:
                self._writer = SQLiteExecutor(await self._hold())
                # WAL persists in the file; setting it here makes any fresh file right.
                await self._writer.execute("PRAGMA journal_mode = WAL")
                self._readers = [SQLiteExecutor(await self._hold()) for _ in range(SQLITE_READERS)]
        except (OSError, asyncpg.PostgresError, sqlite3.Error) as exc:
            await self.close()
            raise DatabaseUnavailable(f"cannot open the database: {exc}") from exc

    async def close(self) -> None:
        for conn in reversed(self._held):
            await conn.__aexit__()
        self._held, self._writer, self._readers = [], None, []
        await self._db.disconnect()

    async def _hold(self) -> Connection:
        # A Connection of our own, not the per-task one `Database.connection()` hands out,
        # so that it outlives the task that opened it.
        conn = Connection(self._db, self._db._backend)
        await conn.__aenter__()
        self._held.append(conn)
        return conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        """One write transaction at a time per process; commits on success.

        On SQLite it begins IMMEDIATE, taking the write lock first, so that nothing inside
        can fail on a lock upgrade; a lock not obtained within the busy timeout raises
        `DatabaseBusy` with nothing changed.
        """
        async with self._write_lock, _translated_errors():
            if self._writer is not None:
                writer = self._writer
                await writer.execute("BEGIN IMMEDIATE")
                try:
                    yield writer
                    await writer.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (it does on some errors).
                    with contextlib.suppress(sqlite3.Error):
                        await writer.execute("ROLLBACK")
                    raise
                return
            async with Connection(self._db, self._db._backend) as conn, conn.transaction():
                yield DatabasesExecutor(conn)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Executor]:
        """A connection for reads outside any write transaction."""
        async with _translated_errors():
            if self._readers:
                yield self._readers[next(self._next_reader)]
                return
            async with Connection(self._db, self._db._backend) as conn:
                yield DatabasesExecutor(conn)

    async def ping(self) -> None:
        async with self.reader() as conn:
            await conn.fetch_one("SELECT 1 AS ok")


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
