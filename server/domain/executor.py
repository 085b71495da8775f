"""What the domain needs from storage: something that runs its SQL.

The inventory operations are written against this protocol, never against a driver:
`server.storage` implements it for SQLite and PostgreSQL, and runs each write operation
inside one transaction (`Store.write`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
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

    async def execute(self, sql: str, values: Values | None = None) -> None: ...

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        """INSERT `rows` (each a tuple of values in `columns` order) into `table`, in as few
        statements as the database allows. SQLite: multi-row VALUES (`insert_values`).
        PostgreSQL: one `INSERT … SELECT * FROM unnest(…)` of one array per column, the
        same statement text for any number of rows."""
        ...


# A table's columns as (name, SQL type: INTEGER, BIGINT or TEXT), for `Executor.insert_rows`.
Columns = tuple[tuple[str, str], ...]

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
            f"INSERT INTO {table} ({names}) VALUES {text}",
            dict(zip(placeholders, flat, strict=True)),
        )


@functools.lru_cache(maxsize=256)
def values_rows(width: int, count: int) -> tuple[str, tuple[str, ...]]:
    """`count` rows of `width` placeholders for a multi-row INSERT (`(:v0, :v1), (:v2, :v3)`)
    and their names in order: bind them with `dict(zip(names, flat_values))`. Made once per
    shape, so a batch of holds does not format a name per value."""
    names = tuple(f"v{n}" for n in range(width * count))
    rows = ", ".join(
        "(" + ", ".join(":" + name for name in names[r * width : (r + 1) * width]) + ")"
        for r in range(count)
    )
    return rows, names
