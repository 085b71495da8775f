"""The shop's API keys, made in the console: only a key's SHA-256 is kept, with its first
characters to tell keys apart. (Keys from SHOP_API_KEYS live in the settings, not here.)"""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.executor import Executor, Row

COLUMNS = "id, name, prefix, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class ShopKey:
    id: int
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, row: Row) -> ShopKey:
        revoked = row["revoked_at"]
        return cls(
            id=int(row["id"]),
            name=str(row["name"]),
            prefix=str(row["prefix"]),
            created_at=int(row["created_at"]),
            revoked_at=None if revoked is None else int(revoked),
        )


async def create(conn: Executor, *, name: str, key_hash: str, prefix: str, now: int) -> ShopKey:
    row = await conn.fetch_one(
        "INSERT INTO shop_keys (id, name, key_hash, prefix, created_at) "
        "SELECT COALESCE(MAX(id), 0) + 1, CAST(:name AS TEXT), CAST(:hash AS TEXT), "
        f"CAST(:prefix AS TEXT), CAST(:now AS BIGINT) FROM shop_keys RETURNING {COLUMNS}",
        {"name": name, "hash": key_hash, "prefix": prefix, "now": now},
    )
    assert row is not None
    return ShopKey.from_row(row)


async def all_keys(conn: Executor) -> list[ShopKey]:
    rows = await conn.fetch_all(f"SELECT {COLUMNS} FROM shop_keys ORDER BY id")
    return [ShopKey.from_row(row) for row in rows]


async def revoke(conn: Executor, key_id: int, *, now: int) -> ShopKey | None:
    """Revoke a key (at once, for every process); revoking twice keeps the first time."""
    row = await conn.fetch_one(
        "UPDATE shop_keys SET revoked_at = COALESCE(revoked_at, :now) WHERE id = :id "
        f"RETURNING {COLUMNS}",
        {"id": key_id, "now": now},
    )
    return None if row is None else ShopKey.from_row(row)


async def is_active(conn: Executor, key_hash: str) -> bool:
    row = await conn.fetch_one(
        "SELECT id FROM shop_keys WHERE key_hash = :hash AND revoked_at IS NULL",
        {"hash": key_hash},
    )
    return row is not None
