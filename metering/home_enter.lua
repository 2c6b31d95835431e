-- home_enter: a user enters this home (their new team's hash slot, or their own), in two calls:
-- first with a deadline (hold nothing for them until it, or until the second call), then with
-- what their old home returned (home_leave.lua), added here.
--
-- KEYS[1] res      hash   the user's reservations and move markers in this home
-- KEYS[2] totals   hash   the user's running totals in this home
-- KEYS[3..] the user's own counters in this home, in home_leave.lua's order
-- ARGV[1] moving until (ms; 0 = the move is done)   ARGV[2] counter key ttl (s)
-- ARGV[3..] per key from KEYS[2]: the number of field/value pairs, then the pairs
-- Returns 'moving' or 'entered'.
-- Refuses (CAPGATE_ARG error, nothing written) non-integer numbers and pairs that do not match
-- the keys.
-- Invariant: while the user is entering, reserve.lua holds nothing here for them ('moving'), so
-- no hold is made against counters that do not yet carry their old home's counts.
local until_ms, ttl = int_arg(1, 0, 'moving until'), int_arg(2, 1, 'ttl')
local at = 3
for i = 2, #KEYS do
  local n = int_arg(at, 0, 'pair count')
  need(at + n * 2 <= #ARGV, 'pairs for every key')
  for p = 1, n do
    local field, amount = ARGV[at + p * 2 - 1], tonumber(ARGV[at + p * 2])
    need(amount ~= nil and amount == math.floor(amount), 'amounts are integers')
    redis.call('HINCRBY', KEYS[i], field, amount)
  end
  if n > 0 and i > 2 then redis.call('EXPIRE', KEYS[i], ttl) end
  at = at + 1 + n * 2
end
need(at == #ARGV + 1, 'pairs for every key')
redis.call('HDEL', KEYS[1], '~moved')
if until_ms > 0 then
  redis.call('HSET', KEYS[1], '~moving', until_ms)
  return 'moving'
end
redis.call('HDEL', KEYS[1], '~moving')
return 'entered'
