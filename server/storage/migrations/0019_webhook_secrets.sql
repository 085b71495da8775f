-- A webhook endpoint signs with up to three live secrets: the current one, the one it
-- replaced (`previous_secret`, until `previous_secret_until`) and the one before that
-- (`older_secret`, until `older_secret_until`), each for a day after it was rotated out.
-- With only the previous one kept, rotating twice within a day cut the first secret's day
-- short while the shop's receiver might still be on it. A rotation moves the previous
-- secret here while its day lasts; a third rotation within a day drops the oldest (at most
-- three signatures in `webhook-signature`). Portable SQL, like 0001.
ALTER TABLE webhook_endpoints ADD COLUMN older_secret TEXT;
ALTER TABLE webhook_endpoints ADD COLUMN older_secret_until BIGINT;
