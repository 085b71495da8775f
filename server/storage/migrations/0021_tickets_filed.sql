-- A shopper's tickets through two indexes, live and filed (issue 17 on a month of history).
-- Portable SQL, like 0001.
--
-- `queue_tickets_of_shopper` (0006) was keyed by the shopper id alone, over every ticket
-- kept (RETENTION_DAYS of past rooms: 450,000 in a month of 30 sales). Shopper ids are
-- random, so each new ticket's entry landed in a leaf page of its own, which its batch's
-- commit wrote to SQLite's WAL and the next checkpoint to the file: a batch of 256 joins
-- wrote ~390 pages on a month-old database against ~120 on an empty one (`python -m
-- bench.joinpages`), and the sale's first 10,240 joins took the writer 0.77 s against
-- 0.26 s. With this migration: ~128 pages and 0.20 s on the month. Now:
--
-- 1. `filed_at` (ms): when the worker filed the ticket, some minutes after it ended
--    (server/domain/retention.py: `file_tickets`, FILE_AFTER_MS); NULL while it is open or
--    ended lately. Nothing but the index a ticket is in depends on it: a filed ticket that
--    its shopper opens again (a join) stays filed and is found the same.
ALTER TABLE queue_tickets ADD COLUMN filed_at BIGINT;

-- 2. Tickets ended before now are filed now (the first worker run would file them).
UPDATE queue_tickets SET filed_at = ended_at WHERE ended_at IS NOT NULL;

-- 3. A shopper's tickets: live ones (a sale's joins go in here, an index the size of the
--    rooms open lately, whatever the history) and filed ones (written by the worker, in
--    bounded batches, minutes after a sale). `tickets_of_shopper` reads both.
CREATE INDEX queue_tickets_live_of_shopper ON queue_tickets (shopper_id) WHERE filed_at IS NULL;
CREATE INDEX queue_tickets_filed_of_shopper ON queue_tickets (shopper_id)
    WHERE filed_at IS NOT NULL;
DROP INDEX queue_tickets_of_shopper;

-- 4. The ended tickets to file, oldest first: ended lately, so few.
CREATE INDEX queue_tickets_to_file ON queue_tickets (ended_at)
    WHERE filed_at IS NULL AND ended_at IS NOT NULL;
