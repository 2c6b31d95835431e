-- home_leave: a user leaves this home (their team's hash slot, or their own) for another: from
-- now on no reservation of theirs is held here, and what their own counters hold is returned to
-- be copied into the new home (home_enter.lua).
--
-- KEYS[1] res      hash   the user's reservations and move markers in this home
-- KEYS[2..] the user's own counters in this home (not their team's)
-- ARGV[1] now (ms)
-- Returns each counter's slots as field/value pairs, in KEYS order.
-- Refuses (CAPGATE_ARG error, nothing written) a `now` that is not a non-negative integer.
-- Invariant: after it, reserve.lua holds nothing here for the user ('moved') and extend.lua
-- grants nothing. The counters stay (requests in flight settle here), so calling it again
-- returns what they hold then: a move cut short is finished by running it again. What they hold
-- is left behind as a copy, dropped if the user ever enters this home again.
redis.call('HSET', KEYS[1], '~moved', int_arg(1, 0, 'now'))
redis.call('HDEL', KEYS[1], '~moving')
local out = {}
for i = 2, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
return out
