"""Versioned schema migrations: `server/storage/migrations/NNNN_name.sql`, applied in order, once.

Each file runs in one transaction together with its row in `schema_migrations`, so a
migration is applied whole or not at all. Concurrent runners (several releases at once) take
the write lock first: SQLite's BEGIN IMMEDIATE, PostgreSQL's transaction advisory lock.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.storage.database import Store

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant will do; it only has to be the same for every runner.
_PG_LOCK_ID = 727_274_001

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def available() -> list[Migration]:
    migrations = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_name.sql")
        migrations.append(
            Migration(int(match[1]), match[2], _statements(path.read_text(encoding="utf-8")))
        )
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError("two migration files share a version number")
    return migrations


def _statements(script: str) -> tuple[str, ...]:
    without_comments = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return tuple(s.strip() for s in without_comments.split(";") if s.strip())


def dialect(statement: str, *, postgres: bool) -> str:
    """A migration's statement for its database. Migrations are portable SQL, but for one
    clause: a table `WITHOUT ROWID` (SQLite: the table is its primary key's b-tree, one
    write per row instead of two) is an ordinary table on PostgreSQL, which has no rowid."""
    if postgres:
        return statement.replace(") WITHOUT ROWID", ")")
    return statement


async def _lock(conn: Executor, postgres: bool) -> None:
    """Inside a write transaction: no other migration runner gets past this at once
    (SQLite's BEGIN IMMEDIATE already holds the write lock)."""
    if postgres:
        await conn.execute("SELECT pg_advisory_xact_lock(:id)", {"id": _PG_LOCK_ID})
    await conn.execute(CREATE_TABLE)


async def pending(store: Store) -> list[Migration]:
    async def read(conn: Executor) -> set[int]:
        await _lock(conn, not store.is_sqlite)
        rows = await conn.fetch_all("SELECT version FROM schema_migrations")
        return {int(row["version"]) for row in rows}

    done = await store.write(read)
    return [m for m in available() if m.version not in done]


async def migrate(store: Store, *, up_to: int | None = None) -> list[Migration]:
    """Apply every pending migration (up to version `up_to`, when given: a database as an
    earlier release left it); returns those applied by this call."""
    applied = []
    for migration in available():
        if up_to is not None and migration.version > up_to:
            break

        async def apply(conn: Executor, migration: Migration = migration) -> bool:
            await _lock(conn, not store.is_sqlite)
            done = await conn.fetch_one(
                "SELECT version FROM schema_migrations WHERE version = :v",
                {"v": migration.version},
            )
            if done is not None:
                return False
            for statement in migration.statements:
                await conn.execute(dialect(statement, postgres=not store.is_sqlite))
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (:v, :name, :at)",
                {"v": migration.version, "name": migration.name, "at": now_ms()},
            )
            return True

        if await store.write(apply):
            logger.info("applied migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
    return applied
