-- home_leave: a user leaves this home (their team's hash slot, or their own) for another: from
-- now on no reservation of theirs is held here, and their counters and totals move out.
--
-- KEYS[1] res      hash   the user's reservations and move markers in this home
-- KEYS[2] totals   hash   the user's running totals in this home
-- KEYS[3..] the user's own counters in this home (not their team's)
-- ARGV[1] now (ms)
-- Returns {totals as field/value pairs, then each counter's slots as field/value pairs}, and
-- deletes them here.
-- Refuses (CAPGATE_ARG error, nothing written) a `now` that is not a non-negative integer.
-- Invariant: after it, reserve.lua holds nothing here for the user ('moved') and extend.lua
-- grants nothing; what the user had counted here is returned exactly once. Holds of requests
-- still in flight move with it whole (their refunds here find nothing to refund).
local now = int_arg(1, 0, 'now')
redis.call('HSET', KEYS[1], '~moved', now)
redis.call('HDEL', KEYS[1], '~moving')
local out = {}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  redis.call('DEL', KEYS[i])
end
return out
