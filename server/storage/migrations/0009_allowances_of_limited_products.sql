-- Allowance rows only for products with a limit per shopper (issue 16; README, Shoppers).
--
-- 0004 kept a row per (shopper, product) for every product, so that setting a limit later
-- would count what shoppers held already; that upsert ran in every identified reservation,
-- and every cancel and expiry took its units back, whether or not the product had a limit.
-- Now a product's rows exist only while it has a limit: setting one fills them from the
-- product's ACTIVE and COMPLETED holds, in the same transaction and under the product's row
-- lock that every reservation takes first (server/domain/inventory.py: `update_product`),
-- and removing it deletes them. The rows of products without a limit go here.
DELETE FROM shopper_allowances
    WHERE product_id IN (SELECT id FROM products WHERE max_per_shopper IS NULL)
