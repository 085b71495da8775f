-- A webhook endpoint's id is never given again. Ids were `MAX(id) + 1`, so the endpoint
-- registered after the newest one was deleted took its id: a second DELETE of the old
-- endpoint (two at once, the first finished) then deleted the new one, and a worker's run
-- for the old one could read the new one under its id. Now each id comes from a counter
-- row, raised in the transaction that registers the endpoint (server/domain/webhooks.py:
-- `create_endpoint`): on PostgreSQL the row's lock takes registrations one at a time, as
-- SQLite's writer does, and a rolled-back registration gives back only an id nobody saw.
-- A counter row rather than SQLite's AUTOINCREMENT or a PostgreSQL sequence: portable SQL
-- like 0001, the same statements on both databases, and no table to rebuild.
--
-- The counter starts past every id still named anywhere (an endpoint, half-deleted or
-- not, its queues, its deliveries). An id deleted whole before this migration is named
-- nowhere and may be given once more; none is after it.
CREATE TABLE id_counters (
    name TEXT PRIMARY KEY,
    last_id BIGINT NOT NULL CHECK (last_id >= 0)
);
INSERT INTO id_counters (name, last_id)
    SELECT 'webhook_endpoints', COALESCE(MAX(id), 0) FROM (
        SELECT id FROM webhook_endpoints
        UNION ALL SELECT endpoint_id AS id FROM webhook_queues
        UNION ALL SELECT endpoint_id AS id FROM webhook_deliveries
    ) AS named;
