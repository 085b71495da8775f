"""Who the shop's backend is: API keys from SHOP_API_KEYS, and keys made in the console.

A key is sent as `Authorization: Bearer <key>`. Keys made here are `fsk_` and 32 random
bytes (URL-safe base64), shown once; only their SHA-256 is stored, so a copy of the
database does not give the keys away, and a revoked key stops working at once in every
process (each check reads the table: one primary-key-sized lookup, on the completion path
only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from server.domain import shopkeys
from server.domain.clock import now_ms
from server.domain.shopkeys import ShopKey
from server.storage.database import Store
from server.storage.errors import UniqueViolation

PREFIX = "fsk_"


def new_key() -> str:
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def looks_like_a_shop_key(token: str, configured: Sequence[bytes]) -> bool:
    """Whether a bearer token is meant as a shop key (`fsk_…`, or one of `configured`, the
    keys of SHOP_API_KEYS as bytes) rather than something else sent in Authorization (a
    shopper's token). Reads no table: a revoked key still looks like one."""
    return token.startswith(PREFIX) or any(
        hmac.compare_digest(token.encode(), k) for k in configured
    )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ShopKeys:
    """The keys of `store`, and those configured (`configured`: SHOP_API_KEYS)."""

    def __init__(self, store: Store, configured: Sequence[str] = ()) -> None:
        self.store = store
        self._configured = [k.encode() for k in configured]

    def looks_like_a_shop_key(self, token: str) -> bool:
        """Whether a bearer token is meant as a shop key (one of ours, or a configured one)
        rather than something else sent in Authorization (a shopper's token)."""
        return looks_like_a_shop_key(token, self._configured)

    async def is_valid(self, key: str) -> bool:
        if any(hmac.compare_digest(key.encode(), k) for k in self._configured):
            return True
        if not key.startswith(PREFIX) or len(key) > 100:
            return False
        async with self.store.reader() as conn:
            return await shopkeys.is_active(conn, digest(key))

    async def create(self, name: str) -> tuple[ShopKey, str]:
        """A new key: its record and the key itself, to show once."""
        key = new_key()
        for attempt in range(5):
            try:
                made = await self.store.write(
                    lambda conn: shopkeys.create(
                        conn, name=name, key_hash=digest(key), prefix=key[:10], now=now_ms()
                    )
                )
                return made, key
            except UniqueViolation:  # two at once chose the same id (PostgreSQL only)
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def all(self) -> list[ShopKey]:
        async with self.store.reader() as conn:
            return await shopkeys.all_keys(conn)

    async def revoke(self, key_id: int) -> ShopKey | None:
        return await self.store.write(lambda conn: shopkeys.revoke(conn, key_id, now=now_ms()))
