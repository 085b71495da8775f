-- The waiting room (issue 17). Portable SQL, like 0001.
--
-- 1. Per product, the operator's choice: `queue` is `off` (no room: first come, first
--    served), `fifo` (arrival order) or `random` (those who joined before the start in a
--    fair random order drawn at the start, later arrivals after them in arrival order);
--    `admit_factor` scales how many shoppers are admitted per unit available (> 0).
ALTER TABLE products ADD COLUMN queue TEXT NOT NULL DEFAULT 'off'
    CHECK (queue IN ('off', 'fifo', 'random'));
ALTER TABLE products ADD COLUMN admit_factor DOUBLE PRECISION NOT NULL DEFAULT 1.0
    CHECK (admit_factor > 0);

-- 2. The tickets: one per shopper per product (the primary key), the truth for the line.
--    `place` orders the line (lowest first): at join, the arrival time in ms times 2^20
--    plus 20 random bits (arrival order; ties within a millisecond in a random order); in
--    `random` mode the draw at the start deals the places of those who joined before it
--    out again in a random order (server/domain/waitingroom.py: `draw`). `state`: waiting,
--    admitted (with a pass until `pass_expires_at`), reserved (the pass was used),
--    sold_out, lapsed (the pass ran out unused) or left. Times are ms.
--    Joining is this one insert.
CREATE TABLE queue_tickets (
    product_id INTEGER NOT NULL,
    shopper_id TEXT NOT NULL,
    place BIGINT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('waiting', 'admitted', 'reserved', 'sold_out', 'lapsed', 'left')),
    joined_at BIGINT NOT NULL,
    admitted_at BIGINT,
    pass_expires_at BIGINT,
    ended_at BIGINT,
    PRIMARY KEY (product_id, shopper_id)
);
-- The line of a product, in order, per state: the head of those waiting (admission), how
-- many wait ahead of a place (a position), the admitted with their passes.
CREATE INDEX queue_tickets_line ON queue_tickets (product_id, state, place);
-- A shopper's tickets (a socket that connects is told of its shopper's tickets).
CREATE INDEX queue_tickets_of_shopper ON queue_tickets (shopper_id);
-- Admissions over time: the recent rate behind an estimated wait, and the console's figures.
CREATE INDEX queue_tickets_admitted ON queue_tickets (product_id, admitted_at)
    WHERE admitted_at IS NOT NULL;

-- 3. Per product with a room: when its random draw was made (NULL: not yet) and the seed
--    it was made with (hex; kept so that the draw can be checked afterwards).
CREATE TABLE queue_rooms (
    product_id INTEGER PRIMARY KEY,
    drawn_at BIGINT,
    draw_seed TEXT
);

-- 4. Who admits: one process at a time across all of them. A process holds the lease
--    while `expires_at` is ahead and renews it in every admission's transaction (which
--    also checks it still holds it); when the holder dies the lease lapses and another
--    process takes it over.
CREATE TABLE queue_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
)
;

-- The products with a room, which the admitter looks at several times a second.
CREATE INDEX products_queued ON products (id) WHERE queue <> 'off'
