-- slot_touch: push out the slot expiry of requests still running on one upstream, so that only a
-- replica that died stops counting.
--
-- KEYS[1] slots  zset of the upstream: request id -> slot expiry (ms)
-- ARGV[1] new expiry (ms)   ARGV[2..] request ids
-- Returns how many of them were still counted (a request freed or expired meanwhile is not re-added).
-- Refuses (CAPGATE_ARG error, nothing written) a non-integer or negative expiry.
local expires = int_arg(1, 0, 'expiry')
local touched = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
    touched = touched + 1
  end
end
return touched
