-- Each room counts its admission steps (`queue_rooms.step`): every step adds one in its own
-- transaction, which the admitter's lease fences, so the numbers of a room's steps only grow,
-- across processes and takeovers. A step's news carries its number (`RoomChanged.step`, like
-- a product's `version`), and each web process's hub keeps the highest it has told per room
-- and drops news that is not newer: an echo from Redis of news told already, or news of an
-- older step that arrives after a newer one. Comparing the news' counts instead could not
-- tell two steps with equal counts apart. Portable SQL, like 0001.
ALTER TABLE queue_rooms ADD COLUMN step BIGINT NOT NULL DEFAULT 0;
