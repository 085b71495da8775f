-- A hold without an Idempotency-Key wrote an entry in the unique index of keys all the same
-- (a NULL, which UNIQUE lets repeat): one b-tree write in every such reservation's
-- transaction, and one to remove it with the hold, for nothing any statement looks up.
-- Only holds with a key are in it now. Every statement that reads it names a key
-- (`idempotency_key = :k` or `IN (…)`), which implies IS NOT NULL: SQLite and PostgreSQL
-- both use a partial index for such a statement. Clearing a key (after a day) takes the
-- hold out of it, as it takes it out of reservations_keyed_by_created.
DROP INDEX reservations_idempotency_key;
CREATE UNIQUE INDEX reservations_idempotency_key ON reservations (idempotency_key)
    WHERE idempotency_key IS NOT NULL
