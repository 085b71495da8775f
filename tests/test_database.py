"""The database layer: write transactions commit or roll back whole, refuse to wait on
anything but the database, and give up with Busy when someone else holds the lock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from server.domain import ledger, outbox
from server.domain.executor import Executor, in_list
from server.storage import migrate
from server.storage.database import Store, sqlite_bound
from server.storage.errors import Busy, Unavailable
from tests.support import eventually, make_product, stats, write_lock_held_elsewhere


class Boom(Exception):
    pass


async def test_a_write_commits_what_it_did(store: Store) -> None:
    product = await make_product(store, 5)

    async def take_two(conn: Executor) -> int:
        row = await conn.fetch_one(
            "UPDATE products SET available_stock = available_stock - 2, "
            "held_units = held_units + 2 WHERE id = :id RETURNING available_stock",
            {"id": product.id},
        )
        assert row is not None
        return int(row["available_stock"])

    assert await store.write(take_two) == 3
    assert (await stats(store, product.id)).available == 3


async def test_a_write_that_raises_changes_nothing(store: Store) -> None:
    product = await make_product(store, 5)

    async def take_then_fail(conn: Executor) -> None:
        await conn.execute(
            "UPDATE products SET available_stock = 0, held_units = total_stock WHERE id = :id",
            {"id": product.id},
        )
        raise Boom

    with pytest.raises(Boom):
        await store.write(take_then_fail)
    assert (await stats(store, product.id)).available == 5


# Texts a shopper, a shop or an operator may give (a cancel reason, an order reference, a
# shopper's id), which the books' INSERT must store exactly as given: quotes, backslashes,
# control characters, JSON's own escapes spelled out, non-ASCII, an astral character.
AWKWARD_TEXTS = (
    'say "hi"',
    "back\\slash \\n not a newline",
    "tab\there\nnewline\r\x01\x1f",
    '{"json": [1, 2]}',
    "\\u00e9 spelled out, é, 中文, 🛒",
    "NULL",
    "",
    "  leading and trailing  ",
)


async def test_inserted_rows_are_stored_exactly_as_given(store: Store) -> None:
    """`insert_rows` and `insert_many` (on PostgreSQL the rows go as one JSON text a table)
    store every value as it was given: awkward texts, None, integers past 2**53."""
    product = await make_product(store, 5)
    big = 2**62 + 1
    ledger_rows = [
        (product.id, big, n, "held", None if n % 2 else text, n, -n, big, 0, 5, text, big - n)
        for n, text in enumerate(AWKWARD_TEXTS)
    ]
    outbox_rows = [
        (product.id, big, n, text, outbox.body("x", 0, {"t": text}), n)
        for n, text in enumerate(AWKWARD_TEXTS)
    ]

    async def write(conn: Executor) -> None:
        await conn.insert_rows(*ledger.rows_of(ledger_rows[:3]))
        await conn.insert_many([ledger.rows_of(ledger_rows[3:]), outbox.rows_of(outbox_rows)])

    await store.write(write)
    async with store.reader() as conn:
        stored = await conn.fetch_all(
            f"SELECT {ledger.COLUMNS} FROM stock_ledger WHERE version = :v ORDER BY seq",
            {"v": big},
        )
        events = await conn.fetch_all(
            "SELECT product_id, version, seq, type, payload, created_at FROM outbox "
            "WHERE version = :v ORDER BY seq",
            {"v": big},
        )
    ledger_names = ledger.COLUMNS.split(", ")
    outbox_names = ("product_id", "version", "seq", "type", "payload", "created_at")
    assert [tuple(row[name] for name in ledger_names) for row in stored] == ledger_rows
    assert [tuple(row[name] for name in outbox_names) for row in events] == outbox_rows


async def test_a_sqlite_write_may_not_wait_on_anything_but_the_database(
    tmp_path: Path,
) -> None:
    """The SQLite writer runs each transaction in one call on its own thread, so that the
    write lock is held only while statements run; a transaction that would wait (on the
    network, say) is refused, and changes nothing."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = Store(url)
    await store.connect()
    await migrate.migrate(store)
    product = await make_product(store, 5)

    async def take_then_sleep(conn: Executor) -> None:
        await conn.execute(
            "UPDATE products SET available_stock = 0, held_units = total_stock WHERE id = :id",
            {"id": product.id},
        )
        await asyncio.sleep(0.01)  # a network call would do the same

    try:
        with pytest.raises(RuntimeError, match="after commit"):
            await store.write(take_then_sleep)
        assert (await stats(store, product.id)).available == 5
    finally:
        await store.close()


async def test_a_held_write_lock_gives_database_busy_within_the_timeout(
    database_url: str,
) -> None:
    store = Store(database_url, busy_timeout_ms=300)
    await store.connect()
    try:
        product = await make_product(store, 5)

        async def take_one(conn: Executor) -> None:
            await conn.execute(
                "UPDATE products SET available_stock = available_stock - 1, "
                "held_units = held_units + 1 WHERE id = :id",
                {"id": product.id},
            )

        async with write_lock_held_elsewhere(database_url, product.id):
            started = time.monotonic()
            with pytest.raises(Busy):
                await store.write(take_one)
            waited = time.monotonic() - started
        assert 0.25 < waited < 5, waited
        # ...and once the lock is free, the same write goes through.
        await store.write(take_one)
        assert (await stats(store, product.id)).available == 4
    finally:
        await store.close()


def test_sqlite_in_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="file"):
        Store("sqlite:///:memory:")


@pytest.mark.postgres
async def test_sessions_killed_by_the_server_give_503s_and_never_a_broken_connection(
    database_url: str,
) -> None:
    """PostgreSQL ending sessions under load (a restart, a failover, an operator's
    pg_terminate_backend) must come out as Unavailable, and the pool must hand
    out working connections afterwards. asyncpg can leave such a connection in the middle
    of an operation and return it to its pool, where every later use raises
    InternalClientError (MagicStack/asyncpg#1069; seen as 500s in the cluster drill that
    restarts PostgreSQL)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    store = Store(database_url, pool_size=4)
    await store.connect()
    admin = await asyncpg.connect(database_url)
    unexpected: list[BaseException] = []
    done = 0
    stopping = asyncio.Event()

    async def write_and_read() -> None:
        nonlocal done
        while not stopping.is_set():
            try:
                await store.write(lambda conn: conn.fetch_one("SELECT pg_sleep(0.002) AS x"))
                await store.ping()
                done += 1
            except (Unavailable, Busy):
                await asyncio.sleep(0.005)
            except Exception as exc:
                unexpected.append(exc)
                await asyncio.sleep(0.005)

    async def kill_sessions() -> None:
        for _ in range(100):
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await asyncio.sleep(0.01)

    try:
        workers = [asyncio.create_task(write_and_read()) for _ in range(6)]
        await kill_sessions()
        # Once the server stops ending sessions, everything works again.
        before = done

        async def recovered() -> bool:
            return done >= before + 50

        await eventually(recovered, within=30, what="working connections from the pool again")
    finally:
        stopping.set()
        await asyncio.gather(*workers)
        await admin.close()
        await store.close()
    assert not unexpected, {repr(e) for e in unexpected}


@pytest.mark.postgres
async def test_a_transaction_whose_client_went_silent_is_ended(database_url: str) -> None:
    """A web process cut off by the network mid-transaction must not hold its row locks
    until the network heals: PostgreSQL ends a session idle in a transaction after half
    the busy timeout, while the others still wait for its locks (the cluster drill
    `partition` has the behaviour; this pins the settings)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    store = Store(database_url, busy_timeout_ms=4_000)
    await store.connect()
    try:
        async with store.reader() as conn:
            idle = await conn.fetch_one("SHOW idle_in_transaction_session_timeout")
            lock = await conn.fetch_one("SHOW lock_timeout")
    finally:
        await store.close()
    assert idle is not None
    assert lock is not None
    assert (idle["idle_in_transaction_session_timeout"], lock["lock_timeout"]) == ("2s", "4s")


@pytest.mark.postgres
async def test_a_snapshot_may_pause_longer_than_a_write_transaction(database_url: str) -> None:
    """The ledger's reconciliation reads the whole history in one snapshot, a page after
    another; on a busy process it may pause between two statements for longer than the
    half busy timeout after which PostgreSQL ends a session idle in a transaction (meant
    for writers that went silent holding row locks; a snapshot holds none). It must not be
    ended then, while a write transaction still is."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    store = Store(database_url, busy_timeout_ms=2_000)  # idle in a transaction: 1 s
    await store.connect()
    try:
        async with store.snapshot() as conn:
            await conn.fetch_one("SELECT 1 AS one")
            await asyncio.sleep(1.5)  # the pause under test: the reader is busy elsewhere
            row = await conn.fetch_one("SELECT 2 AS two")
        assert row is not None
        assert row["two"] == 2
        async with store.reader() as conn:
            setting = await conn.fetch_one("SHOW idle_in_transaction_session_timeout")
        assert setting is not None
        assert setting["idle_in_transaction_session_timeout"] == "1s"  # SET LOCAL ended
    finally:
        await store.close()


def test_sqlite_statements_are_bound_by_number_names_repeated_and_all() -> None:
    """sqlite3 binds `:name` placeholders by asking SQLite each one's name, which SQLite finds
    by walking a list: quadratic, 44 ms for a 500-row INSERT of 6,000 values. They are
    numbered instead, each name once, in the order they first appear."""
    text, values = sqlite_bound(
        "UPDATE t SET a = :a, b = :b WHERE a = :a AND c = :c_1", {"c_1": 3, "b": 2, "a": 1}
    )
    assert text == "UPDATE t SET a = ?1, b = ?2 WHERE a = ?1 AND c = ?3"
    assert values == [1, 2, 3]
    assert sqlite_bound("SELECT 1", None) == ("SELECT 1", ())
    many = ", ".join(f"(:p{n}, :q{n})" for n in range(3_000))
    bound, ordered = sqlite_bound(f"INSERT INTO t (p, q) VALUES {many}", {
        **{f"p{n}": n for n in range(3_000)}, **{f"q{n}": -n for n in range(3_000)}
    })  # fmt: skip
    assert bound.endswith("(?5999, ?6000)")
    assert ordered[-2:] == [2_999, -2_999]


def test_an_in_list_names_each_value_and_refuses_none() -> None:
    """`in_list`: the placeholders of an `IN (…)` and their values, in order; no values is
    an error, not `IN ()`, which neither database takes."""
    assert in_list("r", ["a", "b", "a"]) == (":r0, :r1, :r2", {"r0": "a", "r1": "b", "r2": "a"})
    with pytest.raises(ValueError, match="at least one value"):
        in_list("r", [])
