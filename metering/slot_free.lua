-- slot_free: a request no longer runs on its upstream.
--
-- KEYS[1] slots  zset of the upstream: request id -> slot expiry (ms)
-- ARGV[1] request id
-- Returns 1 if the request was counted there, else 0 (freed before, or expired).
-- Invariant: freeing twice changes nothing the second time.
return redis.call('ZREM', KEYS[1], ARGV[1])
