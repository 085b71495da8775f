-- The shop's books (issue 12): a stock ledger, a transactional outbox and its webhook
-- deliveries, and the shop's API keys. Portable SQL, like 0001.
--
-- 1. The stock ledger: one row per movement of a product's stock, written in the same
--    transaction as the movement (server/domain/ledger.py). A row is keyed by the product's
--    `version` after the change (every stock change raises it by one, in the same UPDATE)
--    and its place among the movements of that change (`seq`: a batch of holds is one
--    change of one version, one row per hold). `available`, `held`, `sold` and `total` are
--    the product's units right after the movement. `actor`: `shopper`, `shopper:<id>`,
--    `operator`, `shop` or `worker`. No foreign keys: ledger rows outlive the holds they
--    name (retention removes holds first).
CREATE TABLE stock_ledger (
    product_id INTEGER NOT NULL,
    version BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    movement TEXT NOT NULL,
    reservation_id TEXT,
    units BIGINT NOT NULL,
    available BIGINT NOT NULL,
    held BIGINT NOT NULL,
    sold BIGINT NOT NULL,
    total BIGINT NOT NULL,
    actor TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (product_id, version, seq)
);
-- A product's movements over a time range (the console's history), and retention.
CREATE INDEX stock_ledger_by_time ON stock_ledger (product_id, at);

-- What the reconciliation has proved: for each product, its units as of `version`, every
-- ledger row up to that version accounted for. The next reconciliation starts from here,
-- so its cost is the rows written since, not a month of them; retention removes only
-- ledger rows at or below it. Products that exist when this migration runs start here at
-- their current units (they had no ledger before).
CREATE TABLE ledger_balances (
    product_id INTEGER PRIMARY KEY,
    version BIGINT NOT NULL,
    available BIGINT NOT NULL,
    held BIGINT NOT NULL,
    sold BIGINT NOT NULL,
    total BIGINT NOT NULL,
    checked_at BIGINT NOT NULL
);
INSERT INTO ledger_balances (product_id, version, available, held, sold, total, checked_at)
    SELECT id, version, available_stock, held_units, sold_units, total_stock, updated_at
    FROM products;

-- 2. The transactional outbox: the events other systems must get, written in the same
--    transaction as the change (server/domain/outbox.py). `id` is the webhook-id, the same
--    for every attempt and every endpoint. Ordered per product by (version, seq), as the
--    ledger. `dispatched_at`: when the worker handed it to the endpoints (made its
--    deliveries); NULL until then.
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    product_id INTEGER NOT NULL,
    version BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    dispatched_at BIGINT
);
CREATE UNIQUE INDEX outbox_order ON outbox (product_id, version, seq);
-- The worker hands events to the endpoints product by product, in order: a product's events
-- commit in version order (its row lock orders their transactions), so any statement sees
-- a prefix of each product's events, never a later one without the earlier.
CREATE INDEX outbox_undispatched ON outbox (product_id, version, seq) WHERE dispatched_at IS NULL;
CREATE INDEX outbox_by_created ON outbox (created_at);

-- Where events go: the shop's receivers, registered by the operator. `events`: the event
-- types it wants, comma-separated, or '' for all. `secret` signs (Standard Webhooks,
-- `whsec_…`); after a rotation the previous one signs too until `previous_secret_until`.
-- `enabled` is 0 or 1; `disabled_reason` says why it is off (the operator, or failing for
-- WEBHOOK_RETRY_HOURS).
CREATE TABLE webhook_endpoints (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    events TEXT NOT NULL DEFAULT '',
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_until BIGINT,
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    disabled_reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One delivery per event and endpoint that wants it. `delivered_at` NULL: still to go.
CREATE TABLE webhook_deliveries (
    event_id TEXT NOT NULL,
    endpoint_id INTEGER NOT NULL,
    product_id INTEGER NOT NULL,
    version BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_attempt_at BIGINT,
    last_status INTEGER,
    last_error TEXT,
    delivered_at BIGINT,
    -- The operator asked for this (delivered) event to be sent again.
    redeliver_at BIGINT,
    PRIMARY KEY (event_id, endpoint_id)
);
-- A queue's next deliveries, in order; only undelivered ones.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, product_id, version, seq)
    WHERE delivered_at IS NULL;
-- An endpoint's recent deliveries (the console), newest first.
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (endpoint_id, created_at);
CREATE INDEX webhook_deliveries_redeliver ON webhook_deliveries (redeliver_at)
    WHERE redeliver_at IS NOT NULL;
CREATE INDEX webhook_deliveries_by_created ON webhook_deliveries (created_at);

-- Per endpoint and product, the queue that keeps that product's events in order: only one
-- worker sends from it at a time (`lease_until`, a time in ms: free when in the past),
-- `pending` deliveries wait in it, and after a failure nothing is sent before
-- `next_attempt_at`. `failing_since`: the first failure since the last success.
CREATE TABLE webhook_queues (
    endpoint_id INTEGER NOT NULL,
    product_id INTEGER NOT NULL,
    pending BIGINT NOT NULL DEFAULT 0 CHECK (pending >= 0),
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_since BIGINT,
    PRIMARY KEY (endpoint_id, product_id)
);
CREATE INDEX webhook_queues_due ON webhook_queues (next_attempt_at) WHERE pending > 0;

-- 3. Completion by the shop: keys for its backend (besides SHOP_API_KEYS), only their
--    SHA-256 kept; and the order reference it sends with a completion.
CREATE TABLE shop_keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
ALTER TABLE reservations ADD COLUMN order_reference TEXT

