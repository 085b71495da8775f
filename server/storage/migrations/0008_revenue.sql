-- Revenue per product (issue 13, item 10): what its sold units brought in, in cents, at the
-- price each sold at. Moved by the completion's own UPDATE (server/domain/inventory.py:
-- `complete`), so that an operator's later price edit does not rewrite past sales and the
-- console reads one row, whatever the history. Products sold before this migration are
-- counted at their price now (the only price known for them).
ALTER TABLE products ADD COLUMN revenue_cents BIGINT NOT NULL DEFAULT 0 CHECK (revenue_cents >= 0);
UPDATE products SET revenue_cents = sold_units * price_cents
