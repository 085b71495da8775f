-- Cost that does not grow with history (issue 18). Portable SQL, like 0001.
--
-- 1. Per-product counters: units held, sold, expired and cancelled, moved in the same
--    statement as `available_stock` by every stock change (server/domain/inventory.py), so
--    that the operator's stats read one row per product instead of summing every hold ever
--    made. The database itself now keeps promise 1: CHECK (available_stock + held_units +
--    sold_units = total_stock) on the row.
--
--    Adding that CHECK to a table with rows: both databases test a CHECK that comes with
--    ADD COLUMN against the rows already there (SQLite since 3.37), and neither adds one
--    to an existing column portably. So the counters are filled in first; the sold units
--    are taken out of total_stock for a moment, so that the rows pass the CHECK when
--    sold_units arrives with its default of 0; then sold units and total go back together.
--    A product whose books did not balance fails the CHECK and the migration rolls back
--    whole: better refused at the release step than carried on silently.

ALTER TABLE products ADD COLUMN held_units BIGINT NOT NULL DEFAULT 0 CHECK (held_units >= 0);
ALTER TABLE products ADD COLUMN expired_units BIGINT NOT NULL DEFAULT 0
    CHECK (expired_units >= 0);
ALTER TABLE products ADD COLUMN cancelled_units BIGINT NOT NULL DEFAULT 0
    CHECK (cancelled_units >= 0);

UPDATE products SET
    held_units = (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                  WHERE r.product_id = products.id AND r.status = 'ACTIVE'),
    expired_units = (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                     WHERE r.product_id = products.id AND r.status = 'EXPIRED'),
    cancelled_units = (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                       WHERE r.product_id = products.id AND r.status = 'CANCELLED'),
    total_stock = total_stock - (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                                 WHERE r.product_id = products.id AND r.status = 'COMPLETED');

ALTER TABLE products ADD COLUMN sold_units BIGINT NOT NULL DEFAULT 0
    CHECK (sold_units >= 0 AND available_stock + held_units + sold_units = total_stock);

UPDATE products SET
    sold_units = (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                  WHERE r.product_id = products.id AND r.status = 'COMPLETED'),
    total_stock = total_stock + (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                                 WHERE r.product_id = products.id AND r.status = 'COMPLETED');

-- 2. Indexes whose use does not depend on the planner's statistics.
--
--    On PostgreSQL, statistics taken while no hold was ACTIVE (a month of ended holds, as
--    autovacuum last saw them) say that no row has status 'ACTIVE'. Every index path that
--    reads only ACTIVE rows then looks free: statements that look holds up by id AND
--    status = 'ACTIVE' (complete, cancel, expire) scanned the index of ACTIVE holds with a
--    filter instead of using the primary key; the batch expiry ran as a nested loop that
--    scanned it once per due hold (14 s per batch of 500 with 20,000 holds open); and a
--    batch UPDATE by 500 ids scanned the whole (product_id, status, created_at) index for
--    "status = 'ACTIVE'" rather than make 500 primary-key lookups. So:
--    - the open holds are indexed on `ended_at IS NULL` (true exactly while a hold is
--      ACTIVE: every transition out of ACTIVE sets ended_at). Only statements that ask
--      for open holds by time say `ended_at IS NULL`, and they have this one index to use;
--    - no index has `status` as a column. Statements by id say `status = 'ACTIVE'`, which
--      no index can answer, so the primary key is their only path, whatever the
--      statistics say.
DROP INDEX reservations_active_by_expiry;
CREATE INDEX reservations_open_by_expiry ON reservations (expires_at, id)
    WHERE ended_at IS NULL;
DROP INDEX reservations_by_product;
-- A product's holds, newest first (the operator's listing of one product).
CREATE INDEX reservations_of_product ON reservations (product_id, created_at);
