-- home_enter: a user enters this home (their new team's hash slot, or their own), in two calls:
-- 'begin' (hold nothing for them until 'end', or until a deadline) and 'end' (their counters
-- here become what their old home returned, home_leave.lua).
--
-- KEYS[1] res      hash   the user's reservations and move markers in this home
-- KEYS[2..] the user's own counters in this home ('end': those the old home's map to, in its order)
-- ARGV[1] 'begin' or 'end'
-- begin: ARGV[2] moving until (ms)
-- end:   ARGV[2] counter key ttl (s), then per key from KEYS[2]: the number of field/value pairs,
--        then the pairs (integers)
-- Returns 'moving' or 'entered'.
-- Refuses (CAPGATE_ARG error, nothing written) non-integer numbers and pairs that do not match
-- the keys.
-- Invariant: while the user is entering, reserve.lua holds nothing here for them ('moving'), so
-- no hold is made against counters that do not yet carry their old home's counts. 'begin' drops
-- the copy a former move left here (the user's counts live where they moved); 'end' sets the
-- counters (it does not add to them) and only while the user is entering, so running a move
-- again never counts anything twice.
local res = KEYS[1]
if ARGV[1] == 'begin' then
  local until_ms = int_arg(2, 0, 'moving until')
  if redis.call('HEXISTS', res, '~moved') == 1 then
    for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
    redis.call('HDEL', res, '~moved')
  end
  redis.call('HSET', res, '~moving', until_ms)
  return 'moving'
end

need(ARGV[1] == 'end', "the step is 'begin' or 'end'")
local ttl = int_arg(2, 1, 'ttl')
local at = 3
for i = 2, #KEYS do
  local n = int_arg(at, 0, 'pair count')
  need(at + n * 2 <= #ARGV, 'pairs for every key')
  for p = 1, n do int_arg(at + p * 2, -9007199254740991, 'amount') end
  at = at + 1 + n * 2
end
need(at == #ARGV + 1, 'pairs for every key')
if redis.call('HEXISTS', res, '~moving') == 0 then return 'entered' end
at = 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[at])
  redis.call('DEL', KEYS[i])
  for p = 1, n do redis.call('HSET', KEYS[i], ARGV[at + p * 2 - 1], ARGV[at + p * 2]) end
  if n > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  at = at + 1 + n * 2
end
redis.call('HDEL', res, '~moving')
return 'entered'
