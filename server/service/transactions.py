"""A use case's write: one transaction around a domain operation, then its events.

The web shop and the worker's expirer both change stock through this, so that every change
is published (and, in a web process, applied to the catalog) the same way, after commit and
never inside the transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.model import Event, Outcome, Product
from server.storage.database import Store

T = TypeVar("T")

# Where committed events go: the publisher's `publish` (server/live/publisher.py) in the
# service, a list in tests. Called synchronously, after commit; it must not wait.
EventSink = Callable[[Sequence[Event]], None]
Operation = Callable[[Executor, int], Awaitable[Outcome[T]]]


class Transactions:
    """Runs domain operations in write transactions of `store`, and hands each committed
    operation's events on: each changed product to every one of `watchers` (a web process's
    promises and catalog), then the events to `publish`.

    `run` gives the operation "now" (ms) read after the transaction has begun (on SQLite,
    after the write lock is held), so time spent waiting for the lock can never let a hold
    be completed after its expiresAt. Raises what `Store.write` raises (`Busy`,
    `Unavailable`, `UniqueViolation`), with nothing changed and nothing published.
    """

    def __init__(
        self,
        store: Store,
        publish: EventSink,
        watchers: Sequence[Callable[[Product], object]] = (),
    ) -> None:
        self.store = store
        self._publish = publish
        self._watchers = tuple(watchers)

    async def run(self, operation: Operation[T]) -> Outcome[T]:
        outcome = await self.store.write(lambda conn: operation(conn, now_ms()))
        self.committed(outcome.events)
        return outcome

    def observe(self, product: Product) -> None:
        """A product as read from the database: the watchers take it (an older figure than
        theirs changes nothing)."""
        for watch in self._watchers:
            watch(product)

    def committed(self, events: Sequence[Event]) -> None:
        """After a commit: the watchers take the new state at once (with no wait in between,
        server/service/promises.py), then it is published."""
        if not events:
            return
        for event in events:
            for watch in self._watchers:
                watch(event.product)
        self._publish(events)
