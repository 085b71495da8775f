"""What storage raises when the database says no, whichever driver said it.

Driver exceptions (`sqlite3`, `asyncpg`) never leave `server.storage`: `Store` translates
them into these, so the layers above handle "the database is busy" or "this row exists
already" without knowing which database runs underneath. None of them is a domain error:
the shopper did nothing wrong, and in every case the transaction changed nothing.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database could not do what was asked; the transaction changed nothing."""


class Busy(StorageError):
    """Another writer held what this one needed beyond the busy timeout (SQLite's write
    lock, a PostgreSQL row lock), or PostgreSQL chose it as a deadlock's victim more than
    `DEADLOCK_RETRIES` times. Worth retrying soon; the API answers 503 `database_busy`."""


class NotAttempted(Busy):
    """A request was not tried, with nothing changed: it waited past its deadline on others'
    account before it reached the database, or the database found a batch of its product
    busy while it waited (its own try would most likely have waited out the same lock, and
    all those waiting would have gone at once; server/service/shop.py: ReserveDeadline).
    `retry_after_s`: when to try again, drawn at random (1 to 3 s), so that the clients
    answered together do not all come back together. The API answers 503 `database_busy`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(StorageError):
    """The database cannot be reached, refused the connection, or lost it. The API answers
    503 `database_unavailable`."""


class UniqueViolation(StorageError):
    """A UNIQUE or PRIMARY KEY constraint refused a row: another transaction made it first
    (two processes choosing the same next product id, or the same Idempotency-Key). Running
    the operation again sees the other row."""
