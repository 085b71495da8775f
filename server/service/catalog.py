"""This process's view of the products, kept current without asking the database.

It is fed by this process's own commits, by every other process's stock events (through the
one Redis subscription), and by a periodic reload that covers anything missed. A product's
`version` only goes up, so an older view never overwrites a newer one, whatever order these
arrive in.

It is a view, never the truth: reservations are decided by the database's conditional
UPDATE. The catalog only lets requests that are certain to fail, fail early: a product sold
out a few milliseconds ago is answered `insufficient_stock` without a write lock
(docs/design.md §1, promise 4), and the product list costs no query.

Every listing (all products, the ones a page names, a page by id) is put together from each
product's JSON, rendered once per version: with 10,000 products the whole list is 1.35 MB,
and rendering it again after every stock change cost more than serving it.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pydantic_core import to_json

from server.domain.inventory import get_products, list_products, product_versions
from server.domain.model import Product
from server.infra.logs import RareLog
from server.storage.database import Store
from server.wire.schemas import product_view

logger = logging.getLogger(__name__)

# A product's version in the database more than this below the catalog's is the truth, not
# an old read: a version the catalog took from a faulty peer's stock message (2**62), or
# one from before the database was restored from a backup. Either would otherwise freeze
# the product here (every real change older than it) until the process restarted. A
# reload's read can legitimately lag the frames that arrive meanwhile by a few versions
# (one a write batch), never by this many.
VERSION_RESET = 1_000
RESET_LOG_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Listing:
    """Products as the JSON array the API answers (`body`), its ETag (the same for the same
    products and versions in every process), and, for a page with older products beyond
    it, the id the next page comes before (None otherwise)."""

    body: bytes
    etag: str
    next_before: int | None = None

    @classmethod
    def of(cls, parts: list[bytes], next_before: int | None = None) -> Listing:
        body = b"[" + b",".join(parts) + b"]"
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        return cls(body, etag, next_before)


class Catalog:
    """Every product as this process last saw it (`Product`, by id), with each one's JSON
    view and the listings made of them cached until the product changes."""

    def __init__(self) -> None:
        self._products: dict[int, Product] = {}
        self._views: dict[int, dict[str, Any]] = {}
        self._json: dict[int, bytes] = {}  # each product's view, rendered, at its version
        # `view_json`'s: each product's view (the very dict `_views` holds) and its JSON.
        self._view_json: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._ids: list[int] | None = None  # sorted; until a product is added
        self._listing: Listing | None = None  # every product; until anything changes
        # The distinct sale start times (ms since the epoch); until a product is added or
        # its start moves. Read 4 times a second by the collector's quiet spells
        # (server/infra/gcpauses.py), which must not walk 10,000 products to find them.
        self._starts: frozenset[int] | None = None
        # Products whose state here was patched from a stock frame (`apply_stock`), not
        # read whole: the periodic reload reads them whole again even at an equal version.
        self._patched: set[int] = set()
        self._resets = RareLog(logger, RESET_LOG_SECONDS)

    def get(self, product_id: int) -> Product | None:
        return self._products.get(product_id)

    def ids(self) -> list[int]:
        """Every product id, in order (do not change the list)."""
        if self._ids is None:
            self._ids = sorted(self._products)
        return self._ids

    def all(self) -> list[Product]:
        return [self._products[i] for i in self.ids()]

    def sale_starts(self) -> frozenset[int]:
        """The distinct `saleStartsAt` of the products that have one (ms since the epoch);
        kept between calls, made again only after a product is added or its start moves."""
        if self._starts is None:
            self._starts = frozenset(
                p.sale_starts_at for p in self._products.values() if p.sale_starts_at is not None
            )
        return self._starts

    def apply(self, product: Product) -> bool:
        """Take a product's state if it is newer than ours; True if it was.

        At equal versions a whole row wins over a view patched from a stock frame."""
        current = self._products.get(product.id)
        if current is not None and (current.version > product.version or current == product):
            if current == product:
                self._patched.discard(product.id)  # the whole row says the same
            return False
        if current is None:
            self._ids = None
        if current is None or current.sale_starts_at != product.sale_starts_at:
            self._starts = None
        self._products[product.id] = product
        self._patched.discard(product.id)
        self._views.pop(product.id, None)
        self._json.pop(product.id, None)
        self._view_json.pop(product.id, None)
        self._listing = None
        return True

    def apply_stock(
        self, product_id: int, available: int, version: int, *, held: int | None = None
    ) -> bool:
        """A stock frame from another process: newer stock (`available` units on sale,
        `held` in holds, None: unchanged) for a product we know."""
        current = self._products.get(product_id)
        if current is None or current.version >= version:
            return False
        held_units = current.held_units if held is None else held
        patched = replace(
            current, available_stock=available, held_units=held_units, version=version
        )
        if not self.apply(patched):
            return False
        self._patched.add(product_id)
        return True

    async def reload(
        self, store: Store, *, resets: set[int] | None = None, whole: bool = True
    ) -> list[Product]:
        """Read every product; returns those that were newer than what we had, and those
        the database has more than VERSION_RESET versions below ours (taken as they are
        there: the database is the truth; logged at most once a minute), whose ids are
        added to `resets` when given: what was told of them (the pages' versions) is to be
        taken back too (`server.live.subscriber.Subscriber._resync`).

        `whole=False` (the periodic reload): every product's version is read, and only the
        rows that differ from ours, or that we have only patched from a stock frame, are
        read whole; the same products are returned and reset as by a whole read."""
        async with store.reader() as conn:
            if whole:
                products = await list_products(conn)
            else:
                versions = await product_versions(conn)
                stale = [i for i, version in versions.items() if self._stale(i, version)]
                products = await get_products(conn, stale) if stale else []
        changed = []
        for product in products:
            current = self._products.get(product.id)
            if current is not None and current.version > product.version + VERSION_RESET:
                self._resets.warning(
                    "catalog: product %d at version %d here but %d in the database; taking "
                    "the database's (a stock message far ahead, or a restored database?)",
                    product.id,
                    current.version,
                    product.version,
                )
                del self._products[product.id]
                if resets is not None:
                    resets.add(product.id)
            if self.apply(product):
                changed.append(product)
        return changed

    def _stale(self, product_id: int, version: int) -> bool:
        """Whether the database's row at `version` may say what ours does not."""
        current = self._products.get(product_id)
        return current is None or current.version != version or product_id in self._patched

    def view(self, product: Product) -> dict[str, Any]:
        """The product's JSON view, rendered once per version."""
        view = self._views.get(product.id)
        if view is None or view["version"] != product.version:
            view = product_view(product)
            if self._products.get(product.id) == product:
                self._views[product.id] = view
        return view

    def view_json(self, product: Product) -> bytes:
        """`view(product)` as JSON, encoded once per version: every answer with a hold
        embeds its product's view, and re-encoding it cost each reservation's answer (issue
        12). A product that is not the catalog's own (newer or older) is encoded each time."""
        view = self.view(product)
        cached = self._view_json.get(product.id)
        if cached is not None and cached[0] is view:
            return cached[1]
        encoded = to_json(view)
        if self._views.get(product.id) is view:
            self._view_json[product.id] = (view, encoded)
        return encoded

    def _encoded(self, product_id: int) -> bytes:
        encoded = self._json.get(product_id)
        if encoded is None:
            encoded = self._json[product_id] = to_json(self.view(self._products[product_id]))
        return encoded

    def listing(self) -> Listing:
        """`GET /api/products`: every product by id, put together once per change."""
        if self._listing is None:
            self._listing = Listing.of([self._encoded(i) for i in self.ids()])
        return self._listing

    def selection(self, product_ids: Iterable[int]) -> Listing:
        """The products among `product_ids` that exist, by id (a page's own products)."""
        known = sorted({i for i in product_ids if i in self._products})
        return Listing.of([self._encoded(i) for i in known])

    def page(self, *, before: int | None, limit: int) -> Listing:
        """The newest `limit` products with ids below `before` (None: the newest of all),
        listed by id; `next_before` is the lowest id listed when older ones remain."""
        ids = self.ids()
        end = len(ids) if before is None else bisect.bisect_left(ids, before)
        chosen = ids[max(0, end - limit) : end]
        more = end > limit
        return Listing.of([self._encoded(i) for i in chosen], chosen[0] if more else None)
