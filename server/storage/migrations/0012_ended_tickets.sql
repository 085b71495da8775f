-- Retention of the waiting room's tickets (issue 17): the worker removes tickets that ended
-- (reserved, sold_out, lapsed, left) more than RETENTION_DAYS ago, oldest first, a bounded
-- batch at a time (server/domain/retention.py: `remove_tickets`). Open tickets (waiting,
-- admitted) have no `ended_at` and are not in this index, so it holds only what retention
-- may take, in the order it takes it.
CREATE INDEX queue_tickets_ended ON queue_tickets (ended_at) WHERE ended_at IS NOT NULL;
