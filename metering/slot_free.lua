-- slot_free: a request no longer runs on its upstream.
--
-- KEYS[1] slots      zset of the upstream: request id -> slot expiry (ms)
-- KEYS[2] victims    zset of the upstream: preemptible request id -> priority
-- KEYS[3] preempted  zset: request id asked to end -> notice expiry (ms)
-- ARGV[1] request id
-- Returns 1 if the request was counted there, else 0 (freed before, or expired).
-- Invariant: freeing twice changes nothing the second time.
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
