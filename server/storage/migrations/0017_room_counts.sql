-- How many wait in each room, kept in the transactions that change it (issue 17's cost):
-- an admission step used to count the line (`COUNT(*)` over every waiting ticket's index
-- entry: 22-42 ms on SQLite, ~420 ms on an unvacuumed PostgreSQL table with 100,000
-- waiting), several times a second, inside the writer's transaction. Now a join adds one,
-- a leave of a waiting ticket takes one off, and an admission step takes off those it
-- admitted and those it closed while waiting (server/domain/waitingroom.py: `add_waiting`).
-- Only the figure shown to people (how many wait) comes from it; admission decides on the
-- passes out (counted) against the units available, as before. Portable SQL, like 0001.
ALTER TABLE queue_rooms ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;

-- Rooms with tickets from before 0013 may have no row yet.
INSERT INTO queue_rooms (product_id)
    SELECT DISTINCT product_id FROM queue_tickets WHERE state = 'waiting'
    ON CONFLICT (product_id) DO NOTHING;

UPDATE queue_rooms SET waiting = (
    SELECT COUNT(*) FROM queue_tickets
    WHERE queue_tickets.product_id = queue_rooms.product_id AND queue_tickets.state = 'waiting'
);
