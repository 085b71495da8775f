-- The outbox keyed by what orders it (issue 12's cost): (product_id, version, seq), the
-- webhook-id derived from that key (server/domain/outbox.py: `event_id`), not stored.
--
-- 0005 gave every event a random text id as its primary key, and so four b-trees besides
-- the table (the id's, the order's, the undispatched events' and one by time), each written
-- in the reservation's transaction: the outbox was the dearest part of a hold's books.
-- Now, in SQLite, the table is its key's b-tree (WITHOUT ROWID; PostgreSQL, which has no
-- such clause, gets a heap and its primary key: `server/storage/migrate.py` drops the
-- clause there), and an event adds one entry more, to the index of undispatched events,
-- which the worker's dispatch removes. Retention's index of old events is partial, on
-- dispatched events only: its entry is written by the dispatch (the worker), not by the
-- reservation's transaction.
--
-- `id`: the webhook-id of an event written before this migration (random, 0005's), kept so
-- that its retries keep their id; NULL for every event written since.
CREATE TABLE outbox_keyed (
    product_id INTEGER NOT NULL,
    version BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    dispatched_at BIGINT,
    id TEXT,
    PRIMARY KEY (product_id, version, seq)
) WITHOUT ROWID;
INSERT INTO outbox_keyed (product_id, version, seq, type, payload, created_at, dispatched_at, id)
    SELECT product_id, version, seq, type, payload, created_at, dispatched_at, id FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_keyed RENAME TO outbox;
-- The worker hands events to the endpoints product by product, in order (see 0005).
CREATE INDEX outbox_undispatched ON outbox (product_id, version, seq) WHERE dispatched_at IS NULL;
-- Retention: dispatched events, oldest first.
CREATE INDEX outbox_dispatched ON outbox (created_at) WHERE dispatched_at IS NOT NULL;

-- The key webhook-ids are derived with: random, one per database, made by the first
-- dispatch (server/domain/webhooks.py: `id_key`), so that two databases (a fresh install,
-- a staging copy) never give two different events the same id.
CREATE TABLE webhook_id_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret TEXT NOT NULL
)
