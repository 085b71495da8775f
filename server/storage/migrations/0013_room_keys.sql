-- The waiting room without a draw at the start (issue 17). Portable SQL, like 0001.
--
-- 1. Each room's secret key (hex, 32 random bytes; never shown): in a `random` room, a
--    ticket that joins before the start gets its place at join as HMAC-SHA256(key,
--    "<sale start ms>:<shopper id>"), in a band below every arrival place
--    (server/domain/waitingroom.py: `drawn_place`), so the line is already in its random
--    order when the sale starts and nothing is written then; the start in the message gives
--    each sale (drop) of the product its own order, with the same key (comment updated after
--    the fact: the key alone repeated the order in every drop; no schema change). Made by
--    the first join (`room_key`). `drawn_at` and
--    `draw_seed` (0006) are no longer used: nothing is drawn at the start any more; they
--    stay (a column dropped is a table rebuilt on older SQLite).
ALTER TABLE queue_rooms ADD COLUMN room_key TEXT;

-- 2. The rooms someone is in (a ticket waiting or admitted): the only ones the admitter
--    steps (`queued_products`, one seek per such room), however many ended rooms there are.
CREATE INDEX queue_tickets_open ON queue_tickets (product_id)
    WHERE state IN ('waiting', 'admitted');

-- The products with a room (0006): the admitter no longer reads them.
DROP INDEX products_queued;
