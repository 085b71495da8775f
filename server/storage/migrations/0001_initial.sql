-- Products and holds. Portable SQL: it runs unchanged on SQLite and PostgreSQL.
-- Times are integer milliseconds since the Unix epoch, UTC (see server/domain/clock.py).

CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    total_stock BIGINT NOT NULL CHECK (total_stock >= 0),
    available_stock BIGINT NOT NULL CHECK (available_stock >= 0),
    version BIGINT NOT NULL DEFAULT 0,
    sale_starts_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CHECK (available_stock <= total_stock)
);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    product_id INTEGER NOT NULL REFERENCES products (id),
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    status TEXT NOT NULL DEFAULT 'ACTIVE'
        CHECK (status IN ('ACTIVE', 'COMPLETED', 'EXPIRED', 'CANCELLED')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    completed_at BIGINT,
    -- When the hold left ACTIVE, whichever way it went.
    ended_at BIGINT,
    -- Cleared once the key is older than a day, so that it may be used again.
    idempotency_key TEXT
);

-- The sweeper's and the expiry jobs' question: which ACTIVE holds are overdue?
CREATE INDEX reservations_active_by_expiry ON reservations (expires_at) WHERE status = 'ACTIVE';
-- Holds of a product (stats, the operator's list), newest first.
CREATE INDEX reservations_by_product ON reservations (product_id, status, created_at);
CREATE INDEX reservations_by_created ON reservations (created_at);
CREATE UNIQUE INDEX reservations_idempotency_key ON reservations (idempotency_key);
-- The sweeper's other question: which keys are older than a day?
CREATE INDEX reservations_keyed_by_created ON reservations (created_at)
    WHERE idempotency_key IS NOT NULL;
