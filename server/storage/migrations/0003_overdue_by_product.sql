-- A product's open holds by expiry time (issue 15: no hold expires while Redis is down).
-- Portable SQL, like 0001.
--
-- A reservation that finds too little stock expires that product's overdue holds in its own
-- transaction and tries again (server/domain/inventory.py, "lazy expiry"), and a web
-- process asks for the earliest expiry among a product's open holds before it answers
-- "Sold out" from the stock it knows (server/service/overdue.py). Both look up one
-- product's open holds by time: with this index, a range of the holds that are overdue
-- (usually none), whatever the history and however many holds other products have open.
-- Like reservations_open_by_expiry (0002), it covers exactly the open holds
-- (`ended_at IS NULL`), so it stays as small as the holds open at once.
CREATE INDEX reservations_open_of_product ON reservations (product_id, expires_at)
    WHERE ended_at IS NULL;
