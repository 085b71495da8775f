"""Idempotency-Keys: their rules, and everything a process does with them.

A retried `POST /api/reservations` with the same key, from the same caller, within
`WINDOW_MS` (a day) returns the hold the first request made (201,
`Idempotent-Replayed: true`) and never holds twice, even when the product has sold out
since; the same key with a different body is `IdempotencyKeyReused` (422). A request that
made no hold left nothing to replay.

Keys are the caller's own (issue 16, as Stripe scopes keys to the account): the key a
request carries is stored and looked up as `scoped_key(caller, key)`, where the caller is
the shopper (`anon:<id>`, `shop:<sub>`) or, for a caller that named no shopper, its
address. The same key from another shopper is another request: it can never be answered
with the first shopper's hold.

Where each part is kept:
- the key's form (`is_valid_key`) and its scope (`scoped_key`): here; the HTTP layer
  refuses malformed keys with 400 and scopes the others;
- inside the reserve transaction, a key that already made a hold is answered from it
  (`server.domain.inventory.reserve`): the database decides, so two processes cannot
  both hold for one key (the UNIQUE index on `reservations.idempotency_key`);
- copies of one request in one batch are answered, in the transaction, as if they had come
  one after another (`server.domain.inventory.reserve`);
- in a web process (`Idempotency`, below): a request that would be refused at once, or
  rate-limited, is first looked up by key (it may have been served), unless its client is
  already at its rate limit and the key is not one of `server.api.ratelimit.RecentKeys`
  (refused before any
  lookup); the worker frees keys older than the window, a bounded number per sweep;
- copies still waiting for the database: `server.service.promises` (`Promises.waiting`).
"""

from __future__ import annotations

import functools

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.errors import IdempotencyKeyReused
from server.domain.executor import Executor
from server.domain.inventory import Held
from server.domain.model import HoldRequest
from server.storage.database import Store

# A key is 1 to 255 printable ASCII characters (HTTP would strip spaces at either end).
MAX_KEY_LENGTH = 255
KEY_PATTERN = "^[!-~]([ -~]*[!-~])?$"
WINDOW_MS = inventory.IDEMPOTENCY_WINDOW_MS
# The sweep's bound: 1,000 keys a sweep, every SWEEP_SECONDS (2 s), is 43 million a day, far
# more than any shop makes, in transactions short enough not to keep reservations or expiry
# waiting on SQLite's writer.
KEYS_PER_SWEEP = 1_000
KEY_BATCH = 250


def is_valid_key(key: str) -> bool:
    """1 to `MAX_KEY_LENGTH` printable ASCII characters."""
    return 1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


def scoped_key(caller: str, key: str) -> str:
    """The key as stored: the caller (a shopper id, or `addr:…`), a tab, the key. A key is
    printable ASCII, so no key holds a tab, and no two callers share a scoped key."""
    return f"{caller}\t{key}"


def same_request(a: HoldRequest, b: HoldRequest) -> bool:
    """Two requests with one key are copies of one request only if they ask the same."""
    return (a.product_id, a.quantity) == (b.product_id, b.quantity)


class Idempotency:
    """A process's dealings with Idempotency-Keys, over `store`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def replay(self, request: HoldRequest) -> Held | None:
        """The hold an earlier request with this key made within the window, or None.

        Raises `IdempotencyKeyReused` if that request asked for something else."""
        if request.idempotency_key is None:
            return None
        async with self._store.reader() as conn:
            earlier = await inventory.get_reservation_by_key(conn, request.idempotency_key)
        if earlier is None or earlier.created_at <= now_ms() - WINDOW_MS:
            return None
        if not same_request(HoldRequest(earlier.product_id, earlier.quantity), request):
            raise IdempotencyKeyReused()
        return Held(earlier, replayed=True)

    async def forget_expired(self, *, batch: int = KEY_BATCH, most: int = KEYS_PER_SWEEP) -> int:
        """Free at most `most` keys of holds older than the window, `batch` per transaction,
        so that a client may use them again (the worker's sweeper); returns how many.

        Bounded, because a backlog (a month of keys when the sweep first runs, or after the
        worker was down a day) cleared in one go kept SQLite's one writer busy for minutes:
        with 474,000 keys waiting, an expiry wave ran 48 s late (`bin/bench history`,
        bench/README.md). Nothing waits on this: a key older than a day is free whether or
        not it has been cleared (`inventory.reserve` and `replay` look at the hold's age), so
        the sweep only keeps the key index small, `KEYS_PER_SWEEP` every `SWEEP_SECONDS`.
        """
        total = 0
        while total < most:
            limit = min(batch, most - total)
            freed = await self._store.write(functools.partial(_forget_keys, limit=limit))
            total += freed
            if freed < limit:
                break
        return total


async def _forget_keys(conn: Executor, *, limit: int) -> int:
    # "now" read inside the transaction (on SQLite, with the write lock held).
    return await inventory.forget_old_idempotency_keys(conn, now=now_ms(), limit=limit)
