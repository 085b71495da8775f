-- Shoppers (issue 16): whose hold is whose, and how many units of a product one shopper
-- may hold or have bought. Portable SQL, like 0001.
--
-- 1. Every hold records its shopper: `anon:<id>` for an anonymous shopper (the signed
--    cookie), `shop:<sub>` for one the shop signed in (a JWT), NULL for a caller that
--    named none (such a hold is anyone's who knows its id, as every hold was before).
ALTER TABLE reservations ADD COLUMN shopper_id TEXT;
-- A shopper's own holds, newest first (GET /api/me/reservations).
CREATE INDEX reservations_of_shopper ON reservations (shopper_id, created_at)
    WHERE shopper_id IS NOT NULL;

-- 2. The operator's limit per shopper, units of one product: NULL is none.
ALTER TABLE products ADD COLUMN max_per_shopper INTEGER
    CHECK (max_per_shopper IS NULL OR max_per_shopper >= 1);

-- 3. Each shopper's units of each product in ACTIVE and COMPLETED holds, kept by the
--    operations that move them (server/domain/inventory.py), in the same transaction: a
--    reservation adds to its row with a conditional upsert (`units + :q <= the limit`), so
--    the limit is decided by the database across processes; a cancel or an expiry takes
--    its units off again. Kept whether or not the product has a limit, so that setting
--    one later counts what shoppers hold already.
CREATE TABLE shopper_allowances (
    product_id INTEGER NOT NULL,
    shopper_id TEXT NOT NULL,
    units BIGINT NOT NULL CHECK (units >= 0),
    -- By shopper first: a shopper's units of every product (the shop page) is a prefix.
    PRIMARY KEY (shopper_id, product_id)
);
