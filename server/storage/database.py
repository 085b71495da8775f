"""How a process reaches the database: one SQL dialect, SQLite or PostgreSQL.

The domain code sees an `Executor` (`fetch_all`, `fetch_one`, `execute` of portable SQL with
`:name` placeholders) inside `Store.write(work)`, one write transaction, or
`Store.reader()`. How each backend is driven was decided by measurement (bench/README.md):

On PostgreSQL, `databases`' asyncpg pool keeps the connections and replaces broken ones;
each unit of work borrows one and runs its SQL on the asyncpg connection underneath
(`raw_connection`), `:name` turned into `$n`: SQLAlchemy's compile of every statement was
most of the cost of a batch of reservations.

SQLite is driven differently, for three measured reasons:

- `databases` opens a fresh aiosqlite connection (and thread) for every acquire. So the
  readers are `databases` connections held for the life of the process, and they run their
  SQL through the aiosqlite connection `databases` hands out (`raw_connection`): one thread
  hop per statement and no SQLAlchemy compile (sqlite3 binds `:name` itself), 5× less
  event-loop time than `databases`' query methods.
- A transaction of several statements, each a hop to another thread and back, holds SQLite's
  write lock across several turns of a busy event loop: under load a web process held it half
  the time, 10 ms at a stretch, and a second writer (another web process, the worker) slept
  in SQLite's busy handler, sometimes for seconds. So each process has one writer, a plain
  sqlite3 connection on a thread of its own, and runs each whole transaction there in one
  call, from BEGIN IMMEDIATE to COMMIT: the lock is held only while the statements run.
- The domain operations are coroutines; against an executor whose methods never suspend
  they run to completion in that one call (`_run_to_completion`). An operation that tried to
  wait on anything else inside a transaction, such as the network, fails loudly instead.

Only `databases`' public API is used: `Database.connection()`, which hands out one
connection per asyncio task (a reader held for the life of the process takes its own from a
short task), and `Connection.raw_connection`. Driver exceptions never leave this package:
`Store` raises `Busy`, `Unavailable` or `UniqueViolation` (server/storage/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import asyncpg
from databases import Database, DatabaseURL
from databases.core import Connection

from server.domain import jsontext
from server.domain.executor import (
    Columns,
    Executor,
    InOrder,
    Row,
    TableRows,
    Values,
    insert_each,
    insert_values,
)
from server.infra.metrics import DATABASE_BUSY
from server.storage.errors import Busy, Unavailable, UniqueViolation

logger = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_READERS = 2
BUSY_RETRY = DATABASE_BUSY.labels("retry")
# PostgreSQL: times a transaction chosen as a deadlock victim is run again before a 503.
DEADLOCK_RETRIES = 2
# PostgreSQL across a network that may drop packets (a partition sends no reset): without
# bounds a request waits for as long as TCP retransmits, many minutes, holding the process's
# writer, and after the network heals it waits out TCP's backoff too (measured through the
# cluster drill: 36 s answered by a partition of 22 s, 13 s to recover). So connecting gives
# up after PG_CONNECT_TIMEOUT_S and a statement after the busy timeout plus
# PG_STATEMENT_MARGIN_S (a lock wait is cut earlier by PostgreSQL's own lock_timeout, the
# margin is for the network); either raises `Unavailable`, and the connection is dropped
# rather than reused.
PG_CONNECT_TIMEOUT_S = 5.0
PG_STATEMENT_MARGIN_S = 5.0
# PostgreSQL ends a session idle in a transaction after half the busy timeout (see `Store`),
# so that a write transaction whose client went silent frees its row locks. A read-only
# snapshot (the ledger's reconciliation, one page of rows after another over the whole
# history) holds no lock, and may pause between statements for longer than that on a busy
# process: it gets this long instead, still bounded, since an open snapshot holds back
# VACUUM.
PG_SNAPSHOT_IDLE_TIMEOUT_S = 60
# Failures after which an asyncpg connection may be left in the middle of an operation. It
# must then be terminated, not handed back: asyncpg can return such a connection to its
# pool, where every later use raises InternalClientError or waits forever
# (MagicStack/asyncpg#1069). Found by the cluster drill that restarts PostgreSQL mid-sale
# (500s); sessions ended by pg_terminate_backend under load wedged a process for good
# (tests/test_database.py). A query the server refused (a lock not granted, a constraint)
# leaves the connection fine: those are not here.
BROKEN_CONNECTION = (
    asyncio.CancelledError,
    OSError,  # TimeoutError (a statement past its bound) included
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)
SWITCH_INTERVAL = 0.0002


class SQLiteExecutor:
    """Each statement in one hop to the connection's thread, bound by sqlite3 itself."""

    def __init__(self, connection: Connection) -> None:
        self._raw: aiosqlite.Connection = connection.raw_connection
        self._raw.row_factory = sqlite3.Row

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        rows = await self._raw.execute_fetchall(*sqlite_bound(sql, values))
        return list(rows)

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        rows = await self.fetch_all(sql, values)
        return rows[0] if rows else None

    async def execute(self, sql: str, values: Values | None = None) -> int:
        before = self._raw.total_changes
        await self._raw.execute_fetchall(*sqlite_bound(sql, values))
        return int(self._raw.total_changes - before)

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        await insert_values(self, table, columns, rows)

    async def insert_many(self, parts: Sequence[TableRows]) -> None:
        await insert_each(self, parts)


class ImmediateSQLiteExecutor:
    """Runs each statement at once, on the thread that calls it: only ever inside
    `SQLiteWriter.run`, on the writer's own thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        return self._conn.execute(*sqlite_bound(sql, values)).fetchall()

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        rows = self._conn.execute(*sqlite_bound(sql, values)).fetchall()
        return rows[0] if rows else None

    async def execute(self, sql: str, values: Values | None = None) -> int:
        cursor = self._conn.execute(*sqlite_bound(sql, values))
        cursor.fetchall()
        return max(0, cursor.rowcount)

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        await insert_values(self, table, columns, rows)

    async def insert_many(self, parts: Sequence[TableRows]) -> None:
        await insert_each(self, parts)


_MUST_NOT_WAIT = (
    "a write transaction waited on something other than the database; do that after commit"
)


def _run_to_completion(work: Awaitable[T]) -> T:
    """Run a coroutine that never suspends, synchronously, and return its result."""
    steps = work.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    except RuntimeError as exc:
        if "event loop" in str(exc):  # asyncio, reached from the writer's thread
            raise RuntimeError(_MUST_NOT_WAIT) from exc
        raise
    steps.close()
    raise RuntimeError(_MUST_NOT_WAIT)


class SQLiteWriter:
    """The process's one SQLite writer: a connection on a thread of its own."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)
        # Between its statements the writer needs the GIL back from a busy event loop,
        # which CPython forces only every switch interval (5 ms by default), with the write
        # lock held all the while. 0.2 ms: ~15% more reservations/s in one web process
        # (bench/README.md). The interval is process-wide; nothing here minds.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))

    def _open(self) -> None:
        # busy_timeout 0: BEGIN IMMEDIATE, the only statement here that waits for another
        # writer, retries itself (see `_begin`).
        conn = sqlite3.connect(self._path, factory=sqlite_connection_class(0), isolation_level=None)
        conn.row_factory = sqlite3.Row
        # WAL persists in the file; setting it here makes any fresh file right.
        conn.execute("PRAGMA journal_mode = WAL")
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    async def run(self, work: Callable[[Executor], Awaitable[T]]) -> T:
        return await self._call(self._transaction, work)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """Take the write lock, waiting up to the busy timeout for another process.

        SQLite's own busy handler sleeps 1, 2, 5, 10, … then 100 ms between tries, which
        is neither fair nor quick: a writer that lost a few rounds to two busy web processes
        waited seconds. Retrying at short random intervals is both, and costs little: the
        lock is only ever held while one transaction's statements run. (WAL readers never
        block the writer, so nothing after BEGIN IMMEDIATE waits.)"""
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
            BUSY_RETRY.inc()
            time.sleep(random.uniform(0.0002, 0.001))

    def _transaction(self, work: Callable[[Executor], Awaitable[T]]) -> T:
        conn = self._conn
        assert conn is not None, "the writer is not open"
        self._begin(conn)
        try:
            result = _run_to_completion(work(ImmediateSQLiteExecutor(conn)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on some errors
                conn.execute("ROLLBACK")
            raise
        return result

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


_PLACEHOLDER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def positional(sql: str, mark: str = "$") -> tuple[str, tuple[str, ...]]:
    """`:name` placeholders → numbered ones, `$1`, `$2`… (asyncpg's; `mark="?"` gives
    SQLite's `?1`, `?2`…), and the names in their order.

    Our SQL has no `::` casts and no colons inside literals (it uses CAST)."""
    # A dict, not a list: a batch of 3,000 holds has 12,000 placeholders, and a list's
    # lookups made this quadratic (seconds of CPU inside the transaction).
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"{mark}{names.setdefault(match[1], len(names) + 1)}"

    return _PLACEHOLDER.sub(number, sql), tuple(names)


def sqlite_bound(sql: str, values: Values | None) -> tuple[str, Sequence[Any]]:
    """The statement with numbered placeholders and its values in their order, for sqlite3.

    sqlite3 binds named placeholders by asking SQLite each one's name, which SQLite finds by
    walking the statement's list of names: quadratic in their number. A ledger or outbox
    INSERT of 500 rows has 6,000 of them: 44 ms bound by name, 0.3 ms by number, which made
    an expiry wave of 10,000 holds take 1.6 s of the single writer instead of 0.1 s."""
    if not values:
        return sql, ()
    text, names = positional(sql, "?")
    if type(values) is InOrder and values.names == names:
        return text, values.flat
    return text, [values[name] for name in names]


class PostgresExecutor:
    """Runs SQL on the asyncpg connection a `databases` connection hands out, skipping
    SQLAlchemy's compile of every statement (most of a batch's cost: ~30 µs per bound
    value); asyncpg prepares each distinct statement once per connection."""

    def __init__(self, connection: Connection) -> None:
        self._raw: asyncpg.Connection = connection.raw_connection

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        text, names = positional(sql)
        given = values or {}
        if type(given) is InOrder and given.names == names:
            rows: list[Row] = await self._raw.fetch(text, *given.flat)
            return rows
        rows = await self._raw.fetch(text, *(given[name] for name in names))
        return rows

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        rows = await self.fetch_all(sql, values)
        return rows[0] if rows else None

    async def execute(self, sql: str, values: Values | None = None) -> int:
        text, names = positional(sql)
        given = values or {}
        if type(given) is InOrder and given.names == names:
            status = await self._raw.execute(text, *given.flat)
        else:
            status = await self._raw.execute(text, *(given[name] for name in names))
        # The command tag: "INSERT 0 1", "UPDATE 3", "DELETE 0", ...
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        """One `INSERT … SELECT … FROM jsonb_array_elements($1)`: the rows as one JSON text
        (`_json_rows`), the same statement text for any number of rows, so asyncpg prepares
        it once and PostgreSQL parses one parameter, not a dozen a row (multi-row VALUES
        made a new prepared statement for every batch size, and cost the client and the
        server about twice as much CPU per row). Raises asyncpg's errors as `execute`."""
        if not rows:
            return
        await self._raw.execute(_json_insert(table, columns), _json_rows(rows))

    async def insert_many(self, parts: Sequence[TableRows]) -> None:
        """One statement for every part (`_json_inserts`): a batch of holds writes its
        holds, ledger rows and outbox events in one round trip, where three statements
        each waited for PostgreSQL's answer inside the single writer's transaction.

        Each part's rows go as one JSON text, not one array a column: asyncpg checks every
        element of an array parameter in Python (`isinstance` against the collections'
        ABCs, to find nested arrays) and encodes it on its own, which cost the web process
        about 7-10 µs a hold for a batch's 26 values a hold (its hold, ledger row and event),
        more than the rest of the books together; the JSON text is made by the C encoder in
        one call a table, about half that, and PostgreSQL's time for the statement did not
        grow (bench/README.md, "The books' insert as JSON")."""
        given = [(table, columns, rows) for table, columns, rows in parts if rows]
        if len(given) < 2:
            for table, columns, rows in given:
                await self.insert_rows(table, columns, rows)
            return
        await self._raw.execute(
            _json_inserts(tuple((table, columns) for table, columns, _ in given)),
            *(_json_rows(rows) for _, _, rows in given),
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection handed back, after asyncpg's own part (a
    transaction left open is rolled back): nothing. asyncpg's default then runs `SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`, one more round trip after
    every unit of work; a writer's batch waited for it under the write lock before its
    requests were answered. Nothing here leaves session state to reset: no session advisory
    locks (migrations take a transaction's), no cursors, no LISTEN, only `SET LOCAL`; the
    session's settings are the connection's own (`server_settings`)."""


@functools.lru_cache(maxsize=64)
def _json_insert(table: str, columns: Columns, number: int = 1) -> str:
    """An INSERT of the rows in parameter `$number`, a JSON array of arrays (`_json_rows`):
    each row's values in `columns`' order, each cast to its column's type (`->>` gives
    a JSON string's text unescaped, and SQL NULL for null)."""
    names = ", ".join(name for name, _ in columns)
    values = ", ".join(f"CAST(r ->> {index} AS {kind})" for index, (_, kind) in enumerate(columns))
    return (
        f"INSERT INTO {table} ({names}) "
        f"SELECT {values} FROM jsonb_array_elements(CAST(${number} AS jsonb)) AS r"
    )


@functools.lru_cache(maxsize=64)
def _json_inserts(tables: tuple[tuple[str, Columns], ...]) -> str:
    """One statement that inserts into each of `tables` (at least two), the n-th table's
    rows in parameter `$n`: every INSERT but the last in a `WITH` (PostgreSQL runs them all,
    whether or not anything reads them). No table depends on another's rows here (no
    foreign key between them), so the order in which PostgreSQL runs them does not
    matter."""
    inserts = [
        _json_insert(table, columns, number)
        for number, (table, columns) in enumerate(tables, start=1)
    ]
    *before, last = inserts
    ctes = ", ".join(f"w{n} AS ({sql})" for n, sql in enumerate(before))
    return f"WITH {ctes} {last}"


def _json_rows(rows: Sequence[Sequence[Any]]) -> str:
    """`rows` (each a tuple or list of ints, strings and None) as one JSON array of arrays,
    for `_json_insert` (`jsontext.compact`). Raises TypeError for a value JSON cannot hold."""
    return jsontext.compact(rows if isinstance(rows, list | tuple) else list(rows))


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
        self._busy_timeout_ms = busy_timeout_ms
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = sqlite_path(url)
            if str(path) in ("", ":memory:"):
                raise ValueError("SQLite needs a file: every connection to :memory: is empty")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = Database(url, factory=sqlite_connection_class(busy_timeout_ms))
        else:
            idle_in_transaction_ms = max(1_000, busy_timeout_ms // 2)
            self._db = Database(
                url,
                min_size=1,
                max_size=pool_size,
                reset=_keep_session,
                timeout=PG_CONNECT_TIMEOUT_S,
                command_timeout=busy_timeout_ms / 1000 + PG_STATEMENT_MARGIN_S,
                server_settings={
                    # Plays the part of SQLite's busy timeout: a row held by someone else's
                    # long transaction makes us answer 503 instead of hanging.
                    "lock_timeout": f"{int(busy_timeout_ms)}ms",
                    # A transaction waits on nothing but the database, so one idle for half
                    # as long as others wait for its locks has lost its client: a web
                    # process cut off by the network mid-transaction, whose COMMIT never
                    # arrives. PostgreSQL then ends it and frees its row locks while the
                    # others still wait. Without it, every other host's holds of that
                    # product answered 503 and its expiries waited until the network
                    # healed (the cluster drill `partition`).
                    "idle_in_transaction_session_timeout": f"{idle_in_transaction_ms}ms",
                    # asyncpg prepares every statement; after five runs PostgreSQL may
                    # cache a generic plan made when the tables looked different (the
                    # sweeper's, from an empty table, turned a 15 ms expiry batch into
                    # 250 ms). Our statements plan in a fraction of a millisecond.
                    "plan_cache_mode": "force_custom_plan",
                },
            )
        self._write_lock = asyncio.Lock()
        self._held: list[Connection] = []
        self._writer: SQLiteWriter | None = None
        self._readers: list[SQLiteExecutor] = []
        self._next_reader = itertools.cycle(range(SQLITE_READERS))

    async def connect(self) -> None:
        try:
            await self._db.connect()
            if self.is_sqlite:
                self._writer = SQLiteWriter(sqlite_path(self.url), self._busy_timeout_ms)
                await self._writer.open()
                self._readers = [SQLiteExecutor(await self._hold()) for _ in range(SQLITE_READERS)]
        except (OSError, asyncpg.PostgresError, sqlite3.Error) as exc:
            await self.close()
            raise Unavailable(f"cannot open the database: {exc}") from exc

    async def close(self) -> None:
        for conn in reversed(self._held):
            await conn.__aexit__()
        if self._writer is not None:
            await self._writer.close()
        self._held, self._writer, self._readers = [], None, []
        await self._db.disconnect()

    async def _hold(self) -> Connection:
        """A connection of our own for the life of the process.

        `Database.connection()` hands out one connection per asyncio task (and returns the
        same one to every call from that task), so each held connection is taken from a
        short task of its own; it outlives that task until `close`."""

        async def acquire() -> Connection:
            conn = self._db.connection()
            await conn.__aenter__()
            return conn

        conn = await asyncio.create_task(acquire())
        self._held.append(conn)
        return conn

    async def write(
        self, work: Callable[[Executor], Awaitable[T]], *, index_order: bool = False
    ) -> T:
        """Run `work` in one write transaction, committed if it returns, rolled back if it
        raises. One at a time per process.

        `index_order`: on PostgreSQL the transaction plans without sorts (`SET LOCAL
        enable_sort = off`, as `index_order_reader`), so an ORDER BY … LIMIT that an index
        gives reads that many entries of it, whatever the planner's statistics say (the
        outbox's dispatch: a bitmap scan and a sort of 80,000 waiting events for 500 on a
        table never analyzed). SQLite: nothing (its planner has no such statistics).

        `work` must only wait on the executor it is given: no network, no sleep. On SQLite
        the transaction begins IMMEDIATE, taking the write lock first, so that nothing
        inside can fail on a lock upgrade; a lock not obtained within the busy timeout
        raises `Busy`, with nothing changed; an unreachable database `Unavailable`, a row
        refused by a UNIQUE or PRIMARY KEY constraint `UniqueViolation`.
        """
        async with _translated_errors():
            if self._writer is not None:
                return await self._writer.run(work)
            async with self._write_lock:
                for attempt in range(DEADLOCK_RETRIES + 1):
                    try:
                        async with self._pooled() as conn, conn.transaction():
                            if index_order:
                                await conn.raw_connection.execute("SET LOCAL enable_sort = off")
                            return await work(PostgresExecutor(conn))
                    except asyncpg.exceptions.DeadlockDetectedError:
                        # Rolled back whole, so it may simply run again; transactions take
                        # products in id order, but rows of `reservations` have no order.
                        if attempt == DEADLOCK_RETRIES:
                            raise
                        logger.info("deadlock, retrying the transaction")
            raise AssertionError("unreachable")

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Executor]:
        """A connection for reads outside any write transaction."""
        async with _translated_errors():
            if self._readers:
                yield self._readers[next(self._next_reader)]
                return
            async with self._pooled() as conn:
                yield PostgresExecutor(conn)

    @asynccontextmanager
    async def index_order_reader(self) -> AsyncIterator[Executor]:
        """A connection for reads whose ORDER BY … LIMIT an index gives, read in that order
        whatever the planner's statistics say.

        PostgreSQL, on a table never analyzed or analyzed while no hold was open, believes a
        handful of rows match and plans a bitmap scan and a sort of every one of them: the
        console's ACTIVE listing sorted 50,000 open holds for 200 (23 ms in the database, 65
        ms a request; ~190 ms with 100,000). Here sorts are off for a READ ONLY transaction
        (`SET LOCAL enable_sort = off`), which leaves the index read in order, so the cost
        is the rows asked for. SQLite: `reader()` (its planner has no such statistics).
        """
        if self.is_sqlite:
            async with self.reader() as conn:
                yield conn
            return
        async with _translated_errors(), self._pooled() as pooled:
            raw: asyncpg.Connection = pooled.raw_connection
            async with raw.transaction(readonly=True):
                await raw.execute("SET LOCAL enable_sort = off")
                yield PostgresExecutor(pooled)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Executor]:
        """A connection whose reads all see the database as of one instant, taking no write
        lock: for checks that compare several tables (the ledger's reconciliation). Each
        statement is bounded as any other; the pauses between them by
        PG_SNAPSHOT_IDLE_TIMEOUT_S on PostgreSQL, not by the busy timeout.

        SQLite: a read transaction on a connection of its own (in WAL a reader's snapshot
        holds from its first read to its end; the shared readers are left alone, so that
        nobody else reads the past). PostgreSQL: a REPEATABLE READ, READ ONLY transaction.
        """
        async with _translated_errors():
            if self.is_sqlite:
                async with Connection(self._db, self._db._backend) as conn:
                    executor = SQLiteExecutor(conn)
                    await executor.execute("BEGIN")
                    try:
                        yield executor
                    finally:
                        await executor.execute("ROLLBACK")
                return
            async with self._pooled() as conn:
                raw: asyncpg.Connection = conn.raw_connection
                async with raw.transaction(isolation="repeatable_read", readonly=True):
                    await raw.execute(
                        "SET LOCAL idle_in_transaction_session_timeout = "
                        f"'{PG_SNAPSHOT_IDLE_TIMEOUT_S}s'"
                    )
                    yield PostgresExecutor(conn)

    @asynccontextmanager
    async def _pooled(self) -> AsyncIterator[Connection]:
        """A connection from the PostgreSQL pool, waited for no longer than a statement may
        take; terminated rather than handed back after a `BROKEN_CONNECTION` failure.

        A `Connection` of its own, not the one `Database.connection()` shares within a task:
        after a terminate that shared one kept the dead connection for every later use by
        the task (a long-lived task, such as a batch runner, failed for good;
        tests/test_database.py)."""
        conn = Connection(self._db, self._db._backend)
        async with asyncio.timeout(self._busy_timeout_ms / 1000 + PG_STATEMENT_MARGIN_S):
            await conn.__aenter__()
        try:
            yield conn
        except BROKEN_CONNECTION:
            # Already detached from the pool if asyncpg saw it close: nothing to end then.
            with contextlib.suppress(asyncpg.exceptions.InterfaceError):
                conn.raw_connection.terminate()
            raise
        finally:
            await conn.__aexit__(None, None, None)

    async def ping(self) -> None:
        async with self.reader() as conn:
            await conn.fetch_one("SELECT 1 AS ok")


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    """Driver errors become storage's own (`server.storage.errors`): busy, unavailable, or a
    UNIQUE constraint. Anything else is a bug and goes up as it is."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorcode in _SQLITE_UNIQUE:
            raise UniqueViolation(str(exc)) from exc
        raise
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise Busy("the database is busy") from exc
        raise
    except asyncpg.exceptions.UniqueViolationError as exc:
        raise UniqueViolation(str(exc)) from exc
    except (
        asyncpg.exceptions.LockNotAvailableError,
        asyncpg.exceptions.DeadlockDetectedError,
        asyncpg.exceptions.SerializationError,
        asyncpg.exceptions.QueryCanceledError,
    ) as exc:
        raise Busy("the database is busy") from exc
    except (
        OSError,
        asyncpg.exceptions.PostgresConnectionError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.CrashShutdownError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.InternalClientError,
    ) as exc:
        # The driver's text names hosts and ports: it goes to the log, not to the caller.
        logger.warning("database unavailable: %r", exc)
        raise Unavailable("The database cannot be reached right now. Try again shortly.") from exc


_SQLITE_UNIQUE = (sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY)
