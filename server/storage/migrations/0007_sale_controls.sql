-- The operator's sale controls (issue 13, item 11). Portable SQL, like 0001.
--
-- `paused_at`: when the operator paused reservations (NULL: not paused). While paused, new
-- holds are refused (409 `sale_paused`); holds already made can still be bought.
-- `sale_ends_at`: when the sale ends (NULL: it does not); from then on new holds are
-- refused (409 `sale_ended`). Ending a sale now sets it to now. Neither moves stock.
ALTER TABLE products ADD COLUMN paused_at BIGINT;
ALTER TABLE products ADD COLUMN sale_ends_at BIGINT;

-- Who cancelled a hold (`shopper` or `operator`), and the operator's reason, shown to the
-- shopper whose hold it was. NULL for holds that were not cancelled.
ALTER TABLE reservations ADD COLUMN cancelled_by TEXT;
ALTER TABLE reservations ADD COLUMN cancel_reason TEXT
