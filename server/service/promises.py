"""Units promised to this process's reservations that are waiting for the database: what the
fast refusal subtracts from the stock it knows.

In a storm the first hundred requests promise the last hundred units, and the thousands behind
them are answered "sold out" at once, without a write lock and without waiting behind a queue
of batches (README, "refuses only what it knows cannot succeed"). Such an answer must never
refuse what the database would grant at that moment. It subtracts promises from a *figure*, a
product as this process last saw it (from its catalog or a read), so the two must agree:

- A product's `version` goes up with every change of its row, under the row's lock (SQLite's
  write lock), so versions commit in order.
- A promise not yet sent to the database is in no figure: it *counts* (it will take its
  units, if they are there, before any request that comes after it).
- A promise sent to the database is tagged with the newest version of its product seen when
  its batch was sent. Its commit, if it takes anything, makes a version above that tag, so it
  counts against figures up to its tag. A newer figure may or may not include it (the batch
  committed but its caller has not resumed yet; the catalog was reloaded, or another
  process's change arrived, in between): for that figure it is *uncertain*.
- A copy of a request already waiting (the same Idempotency-Key) is a replay if the first
  makes the hold, but a request of its own if the first is refused: it is uncertain.
- So is any other request with an Idempotency-Key: the key may have made its hold already (a
  client's retry after a lost answer; the hold made here or in another process, in a figure
  or not), and the database then replays that hold and takes nothing. Unless told to count
  them (`left(…, keys_new=True)`: what the requests would leave if every key were new).
- The database grants, in order, each request that still fits (first come, first served), so
  a request for more than is left takes nothing and a smaller one behind it may be granted.
- A request with a shopper, of a product with a limit per shopper (`max_per_shopper`), takes
  nothing if its shopper is at the limit, which this process cannot know (their holds, here
  or in another process): it is uncertain. But one shopper's waiting requests take at most
  the limit between them, and one for more than the limit takes nothing (README, Shoppers;
  else a shopper at their limit who floods requests would keep every unit "promised").

So a request queued now can be granted at most `left(figure)` units:

- when every waiting request, counted or uncertain, fits in the figure (nearly always: a
  promise is only made when it fits), the figure minus the promises counted;
- when they do not fit and none is uncertain, what allocating the figure to them in order
  leaves;
- otherwise the figure minus each counted promise that fits even if every request ahead of
  it takes all it asks for, each shopper's at most the limit (those take their units
  whatever happens to the uncertain ones).

A request for more than `left(figure)` is refused at once. One for more than what the
requests would leave if every key were new, but no more than `left(figure)`, would be refused
only if some keyed promises take their units: in a storm where every request carries a key,
the thousands behind the first hundred promises. Such a request waits, without touching the
database, until the keyed promises waiting now have settled (`keyed_settled`: their batch
committed, and the catalog has what it did, or failed; a batch's time, a few ms), and its
refusal is reckoned again from the newer figure (server/service/shop.py, a bounded number of
times; then the database decides it).

The database decides every reservation; this only decides which requests are certain to fail.
tests/test_promises.py checks every fast refusal against the database over many interleavings.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from server.domain.model import HoldRequest, Product


@dataclass(eq=False, slots=True)
class Promise:
    """`quantity` units of `product_id` promised to one waiting request.

    `copy`: the request repeats one already waiting (its Idempotency-Key). `sent_after`:
    None until the request's batch is sent to the database; then the newest version of the
    product seen at that moment. `shopper`: who asks, if known."""

    product_id: int
    quantity: int
    key: str | None
    shopper: str | None = None
    copy: bool = False
    sent_after: int | None = None
    settled: bool = False


class Promises:
    """The promises of one process's waiting reservations, by product (one event loop's)."""

    def __init__(self) -> None:
        self._unsent: Counter[int] = Counter()  # product → units not yet sent (not copies)
        self._sent: dict[int, Counter[int]] = {}  # product → {version sent after → units}
        self._copies: Counter[int] = Counter()  # product → units asked for by copies
        # product → its waiting promises, in the order they reach the database
        self._queue: dict[int, dict[Promise, None]] = {}
        self._seen: dict[int, int] = {}  # product → newest version seen
        self._keys: set[str] = set()  # Idempotency-Keys of waiting promises (not copies)
        # product → units of the waiting promises (not copies) that have a shopper
        self._shoppers: Counter[int] = Counter()
        # Of `_unsent` and `_sent`, the units of promises with a key (not copies)
        self._keyed_unsent: Counter[int] = Counter()
        self._keyed_sent: dict[int, Counter[int]] = {}
        self._newest_keyed: dict[int, Promise] = {}  # product → its newest such promise
        # promise → what the requests waiting for it to settle wait on, and how many they are
        self._settling: dict[Promise, asyncio.Future[None]] = {}
        self._parked: Counter[Promise] = Counter()

    def observe(self, product: Product) -> None:
        """A figure of `product` this process has seen (read, committed or received)."""
        if product.version > self._seen.get(product.id, -1):
            self._seen[product.id] = product.version

    def left(self, product: Product, *, keys_new: bool = False) -> int:
        """At most how many units of `product` a request queued now could be granted, as
        of this figure (may be negative). A request for more is certain to be refused.

        `keys_new`: count the promises with a key as those without one (as if no key had
        made a hold yet): a request for more is refused unless some of them are retries."""
        self.observe(product)
        if product.id not in self._queue:
            # Nothing promised (a sold-out product's refusals): the figure, as the count
            # below would find it, without walking the counts.
            return product.available_stock
        version, figure = product.version, product.available_stock
        limit = product.max_per_shopper
        counted = self._unsent.get(product.id, 0)
        uncertain = self._copies.get(product.id, 0)
        for after, units in self._sent.get(product.id, {}).items():
            if after >= version:
                counted += units
            else:
                uncertain += units
        if not keys_new:
            keyed = self._keyed_unsent.get(product.id, 0)
            for after, units in self._keyed_sent.get(product.id, {}).items():
                if after >= version:
                    keyed += units
            counted -= keyed
            uncertain += keyed
        shoppers = self._shoppers.get(product.id, 0)
        if limit is not None and shoppers:
            # The shoppers' promises are all uncertain: if no other one is waiting, nothing
            # is certain to be taken (a storm of shoppers); else the slower count below.
            if shoppers == self._unsent.get(product.id, 0) + sum(
                self._sent.get(product.id, {}).values()
            ):
                return figure
            return self._left_in_order(product, limit, keys_new=keys_new)
        if counted + uncertain <= figure:
            return figure - counted
        # More is asked for than the figure has: some waiting requests will be refused.
        queue = self._queue.get(product.id, {})
        available = figure
        if not uncertain:
            for promise in queue:
                if promise.quantity <= available:
                    available -= promise.quantity
            return available
        return self._left_in_order(product, limit, keys_new=keys_new)

    def _left_in_order(self, product: Product, limit: int | None, *, keys_new: bool) -> int:
        """`left` when some waiting requests are uncertain: the figure minus each counted
        promise that fits even if every request ahead of it takes all it may."""
        version, figure = product.version, product.available_stock
        available = figure
        ahead = 0
        queue = self._queue.get(product.id, {})
        if limit is None:
            for promise in queue:
                if (
                    _counts(promise, version, keys_new=keys_new)
                    and ahead + promise.quantity <= figure
                ):
                    available -= promise.quantity
                ahead += promise.quantity
            return available
        shoppers: Counter[str] = Counter()  # units each shopper's requests so far may take
        for promise in queue:
            quantity, shopper = promise.quantity, promise.shopper
            if shopper is not None:
                # Uncertain (at their limit, it takes nothing). More than the limit: never
                # granted. Together, the shopper's take at most the limit.
                if quantity <= limit:
                    may = min(quantity, limit - shoppers[shopper])
                    shoppers[shopper] += may
                    ahead += may
                continue
            if _counts(promise, version, keys_new=keys_new) and ahead + quantity <= figure:
                available -= quantity
            ahead += quantity
        return available

    def waiting(self, key: str | None) -> bool:
        """Whether a request with this Idempotency-Key is promised and waiting."""
        return key is not None and key in self._keys

    def make(self, request: HoldRequest) -> Promise:
        """Promise `request`'s units, at the back of the queue (as a copy if a request with
        its Idempotency-Key is waiting)."""
        key = request.idempotency_key
        promise = Promise(
            request.product_id,
            request.quantity,
            key,
            request.shopper_id,
            copy=self.waiting(key),
        )
        if promise.copy:
            self._copies[request.product_id] += request.quantity
        else:
            if key is not None:
                self._keys.add(key)
                self._keyed_unsent[request.product_id] += request.quantity
                self._newest_keyed[request.product_id] = promise
            self._unsent[request.product_id] += request.quantity
            if promise.shopper is not None:
                self._shoppers[request.product_id] += request.quantity
        self._queue.setdefault(request.product_id, {})[promise] = None
        return promise

    def send(self, promise: Promise) -> None:
        """The batch carrying `promise` goes to the database now."""
        if promise.settled or promise.sent_after is not None:
            return
        promise.sent_after = self._seen.get(promise.product_id, 0)
        if not promise.copy:
            _take(self._unsent, promise.product_id, promise.quantity)
            sent = self._sent.setdefault(promise.product_id, Counter())
            sent[promise.sent_after] += promise.quantity
            if promise.key is not None:
                _take(self._keyed_unsent, promise.product_id, promise.quantity)
                keyed = self._keyed_sent.setdefault(promise.product_id, Counter())
                keyed[promise.sent_after] += promise.quantity

    def settle(self, promise: Promise) -> None:
        """Its batch has committed (and the catalog has what it did) or failed. Once; more
        calls do nothing."""
        if promise.settled:
            return
        promise.settled = True
        product_id = promise.product_id
        if promise.copy:
            _take(self._copies, product_id, promise.quantity)
        elif promise.sent_after is None:
            _take(self._unsent, product_id, promise.quantity)
            if promise.key is not None:
                _take(self._keyed_unsent, product_id, promise.quantity)
        else:
            _take_sent(self._sent, promise)
            if promise.key is not None:
                _take_sent(self._keyed_sent, promise)
        if not promise.copy:
            if promise.key is not None:
                self._keys.discard(promise.key)
                if self._newest_keyed.get(product_id) is promise:
                    del self._newest_keyed[product_id]
            if promise.shopper is not None:
                _take(self._shoppers, product_id, promise.quantity)
        queue = self._queue[product_id]
        del queue[promise]
        if not queue:
            del self._queue[product_id]
        self._parked.pop(promise, None)
        settling = self._settling.pop(promise, None)
        if settling is not None:
            settling.set_result(None)

    async def keyed_settled(self, product_id: int) -> None:
        """Wait until the promises with a key of `product_id` waiting now have settled (at
        once if there are none): until the newest of them has, as batches go in order.
        Cancelling the wait leaves the promises as they are."""
        promise = self._newest_keyed.get(product_id)
        if promise is None:
            return
        settling = self._settling.get(promise)
        if settling is None:
            settling = asyncio.get_running_loop().create_future()
            self._settling[promise] = settling
        self._parked[promise] += 1
        try:
            await asyncio.shield(settling)
        finally:
            if not settling.done():  # its caller went away first
                self._parked[promise] -= 1
                if not self._parked[promise]:
                    del self._parked[promise]

    @property
    def parked(self) -> int:
        """Requests waiting in `keyed_settled` for promises not yet settled."""
        return sum(self._parked.values())

    @property
    def empty(self) -> bool:
        """Nothing is promised."""
        return not (
            self._unsent
            or self._sent
            or self._copies
            or self._queue
            or self._keys
            or self._shoppers
            or self._keyed_unsent
            or self._keyed_sent
            or self._newest_keyed
            or self._settling
            or self._parked
        )


def _take(counter: Counter[int], key: int, units: int) -> None:
    counter[key] -= units
    if not counter[key]:
        del counter[key]


def _counts(promise: Promise, version: int, *, keys_new: bool) -> bool:
    """Whether `promise` is certain to take its units against a figure of `version`: not a
    copy, without a key (unless `keys_new`: every key counted as new), and not sent to the
    database before that figure was read (module docstring)."""
    return (
        not promise.copy
        and (keys_new or promise.key is None)
        and (promise.sent_after is None or promise.sent_after >= version)
    )


def _take_sent(sent: dict[int, Counter[int]], promise: Promise) -> None:
    """`promise`'s units out of `sent` (product → {version sent after → units})."""
    assert promise.sent_after is not None
    by_version = sent[promise.product_id]
    _take(by_version, promise.sent_after, promise.quantity)
    if not by_version:
        del sent[promise.product_id]
