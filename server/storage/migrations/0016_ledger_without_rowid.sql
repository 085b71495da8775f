-- The stock ledger stored as its primary key's b-tree (issue 12's cost). A table with a
-- composite primary key is, in SQLite, a rowid table and a separate index of the key: two
-- b-trees written per ledger row, in every reservation's and every expiry's transaction,
-- besides the index by moment (0011). `WITHOUT ROWID` makes the key the table: one write
-- fewer per movement. PostgreSQL has no such clause (`server/storage/migrate.py` drops it)
-- and keeps a heap and its primary key, as before. Nothing reads a ledger row's rowid.
CREATE TABLE stock_ledger_keyed (
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
) WITHOUT ROWID;
INSERT INTO stock_ledger_keyed (product_id, version, seq, movement, reservation_id, units,
        available, held, sold, total, actor, at)
    SELECT product_id, version, seq, movement, reservation_id, units, available, held, sold,
        total, actor, at
    FROM stock_ledger;
DROP TABLE stock_ledger;
ALTER TABLE stock_ledger_keyed RENAME TO stock_ledger;
-- A product's movements over a time range, in their order (0011).
CREATE INDEX stock_ledger_by_moment ON stock_ledger (product_id, at, version, seq)
