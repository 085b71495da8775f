"""What the domain needs from storage: something that runs its SQL.

The inventory operations are written against this protocol, never against a driver:
`server.storage` implements it for SQLite and PostgreSQL, and runs each write operation
inside one transaction (`Store.write`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

Values = Mapping[str, Any]


class Row(Protocol):
    """A database row, read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str) -> Any: ...


class Executor(Protocol):
    """Runs portable SQL (`:name` placeholders) on one connection.

    The same statement text runs on SQLite and PostgreSQL: `:name` placeholders, RETURNING,
    CAST, no `::` casts and no colons inside literals.
    """

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]: ...

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None: ...

    async def execute(self, sql: str, values: Values | None = None) -> int:
        """Runs a statement; returns how many rows it changed (inserted, updated or
        deleted, as the database counts them: an upsert's insert or update is one, a
        conflict it left alone none). A statement that changes nothing returns 0 or what
        the database says of it (PostgreSQL: a SELECT's row count)."""
        ...

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        """INSERT `rows` (each a tuple of values in `columns` order) into `table`, in as few
        statements as the database allows. SQLite: multi-row VALUES (`insert_values`).
        PostgreSQL: one `INSERT … SELECT … FROM jsonb_array_elements(…)` of the rows as one
        JSON text, the same statement text for any number of rows."""
        ...

    async def insert_many(self, parts: Sequence[TableRows]) -> None:
        """INSERT each part's rows (`(table, columns, rows)`, as `insert_rows` takes them)
        into its table; parts without rows are skipped. PostgreSQL: all of them in one
        statement (each part but the last a data-modifying `WITH`, one JSON text a part),
        one round trip however many tables and rows, its text the same for any numbers of
        rows. SQLite: `insert_rows` for each part in turn (`insert_each`: its statements run
        on the writer's own thread, with no round trip to save)."""
        ...


# A table's columns as (name, SQL type: INTEGER, BIGINT or TEXT), for `Executor.insert_rows`.
Columns = tuple[tuple[str, str], ...]

# Rows of one table for `Executor.insert_many`: (table, its columns, the rows, each a tuple of
# values in `columns` order).
TableRows = tuple[str, Columns, Sequence[Sequence[Any]]]

# Rows per multi-row VALUES: well inside both databases' limits on bound values.
INSERT_CHUNK = 1000


async def insert_values(
    conn: Executor, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
) -> None:
    """`Executor.insert_rows` as portable SQL: one multi-row INSERT … VALUES per
    `INSERT_CHUNK` rows, whose placeholders are made once per shape (`values_rows`)."""
    names = ", ".join(name for name, _ in columns)
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        text, placeholders = values_rows(len(columns), len(chunk))
        flat = [value for row in chunk for value in row]
        await conn.execute(
            f"INSERT INTO {table} ({names}) VALUES {text}", InOrder(placeholders, flat)
        )


async def insert_each(conn: Executor, parts: Sequence[TableRows]) -> None:
    """`Executor.insert_many` as one `insert_rows` a part, in order."""
    for table, columns, rows in parts:
        if rows:
            await conn.insert_rows(table, columns, rows)


class InOrder(Mapping[str, Any]):
    """The values of `values_rows`' placeholders: `names` (its names, in order) and `flat`
    (a value for each, in the same order). Read as a mapping it is `dict(zip(names, flat))`;
    a driver that binds by number takes `flat` as it is, when the statement's placeholders
    are `names` in that order (`server.storage.database`), instead of building the dict and
    looking each name up again: a ledger INSERT of 64 holds binds 768 values.

    Raises ValueError if `names` and `flat` differ in length."""

    __slots__ = ("_by_name", "flat", "names")

    def __init__(self, names: tuple[str, ...], flat: Sequence[Any]) -> None:
        if len(names) != len(flat):
            raise ValueError(f"{len(names)} placeholders, {len(flat)} values")
        self.names = names
        self.flat = flat
        self._by_name: dict[str, Any] | None = None

    def _map(self) -> dict[str, Any]:
        if self._by_name is None:
            self._by_name = dict(zip(self.names, self.flat, strict=True))
        return self._by_name

    def __getitem__(self, name: str) -> Any:
        return self._map()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def in_list(prefix: str, values: Iterable[Any]) -> tuple[str, dict[str, Any]]:
    """`values` as the inside of an SQL `IN (…)`: its named placeholders (`:r0, :r1`, with
    `prefix` r) and their values by name, to merge into the statement's. At least one value:
    `IN ()` is not SQL (raises ValueError)."""
    named = {f"{prefix}{n}": value for n, value in enumerate(values)}
    if not named:
        raise ValueError("an IN list needs at least one value")
    return ", ".join(":" + name for name in named), named


@functools.lru_cache(maxsize=256)
def values_rows(width: int, count: int) -> tuple[str, tuple[str, ...]]:
    """`count` rows of `width` placeholders for a multi-row INSERT (`(:v0, :v1), (:v2, :v3)`)
    and their names in order: bind them with `InOrder(names, flat_values)`. Made once per
    shape, so a batch of holds does not format a name per value."""
    names = tuple(f"v{n}" for n in range(width * count))
    rows = ", ".join(
        "(" + ", ".join(":" + name for name in names[r * width : (r + 1) * width]) + ")"
        for r in range(count)
    )
    return rows, names
