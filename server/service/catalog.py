"""This process's view of the products, kept current without asking the database.

It is fed by this process's own commits, by every other process's stock events (through the
one Redis subscription), and by a periodic reload that covers anything missed. A product's
`version` only goes up, so an older view never overwrites a newer one, whatever order these
arrive in.

It is a view, never the truth: reservations are decided by the database's conditional
UPDATE. The catalog only lets requests that are certain to fail, fail early: a product sold
out a few milliseconds ago is answered `insufficient_stock` without a write lock
(DESIGN.md §1, promise 4), and the product list costs no query.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from pydantic_core import to_json

from server.domain.inventory import list_products
from server.domain.model import Product
from server.storage.database import Store
from server.wire.schemas import product_view


class Catalog:
    def __init__(self) -> None:
        self._products: dict[int, Product] = {}
        self._views: dict[int, dict[str, Any]] = {}
        self._listing: tuple[bytes, str] | None = None

    def get(self, product_id: int) -> Product | None:
        return self._products.get(product_id)

    def all(self) -> list[Product]:
        return [self._products[i] for i in sorted(self._products)]

    def apply(self, product: Product) -> bool:
        """Take a product's state if it is newer than ours; True if it was.

        At equal versions a whole row wins over a view patched from a stock frame."""
        current = self._products.get(product.id)
        if current is not None and (current.version > product.version or current == product):
            return False
        self._products[product.id] = product
        self._views.pop(product.id, None)
        self._listing = None
        return True

    def apply_stock(self, product_id: int, available: int, version: int) -> bool:
        """A stock frame from another process: newer stock for a product we know."""
        current = self._products.get(product_id)
        if current is None or current.version >= version:
            return False
        return self.apply(replace(current, available_stock=available, version=version))

    async def reload(self, store: Store) -> list[Product]:
        """Read every product; returns those that were newer than what we had."""
        async with store.reader() as conn:
            products = await list_products(conn)
        return [p for p in products if self.apply(p)]

    def view(self, product: Product) -> dict[str, Any]:
        """The product's JSON view, rendered once per version."""
        view = self._views.get(product.id)
        if view is None or view["version"] != product.version:
            view = product_view(product)
            if self._products.get(product.id) == product:
                self._views[product.id] = view
        return view

    def listing(self) -> tuple[bytes, str]:
        """`GET /api/products`: the body and its ETag, rendered once per change."""
        if self._listing is None:
            body = to_json([self.view(p) for p in self.all()])
            etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
            self._listing = (body, etag)
        return self._listing
