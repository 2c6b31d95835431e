-- reserve: hold tokens and money for one request across all of its counters (the user's windows
-- and their team's, tokens and spend), atomically.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON); the home's move markers
-- KEYS[2] live     zset   request id -> lease expiry (ms); its size is the user's concurrency
-- KEYS[3] totals   hash   the user's running totals (overall and per tier)
-- KEYS[4] ledger   stream the user's usage events
-- KEYS[5] settled  zset   request ids already settled (or reaped) -> time (ms)
-- KEYS[6..] one hash per counter (lib.lua), the user's and their team's, all in the user's home
-- ARGV[1] request id      ARGV[2] now (ms)          ARGV[3] lease expiry (ms)
-- ARGV[4] fixed tokens (the counted prompt bound)   ARGV[5] least completion grant worth serving
-- ARGV[6] completion tokens wanted                  ARGV[7] concurrency limit (0 = none)
-- ARGV[8] record JSON (user, tier, model, prices, counting flags), completed here
-- ARGV[9] fixed value (nano: the prompt bound at the dearer prompt price)
-- ARGV[10..] per counter: cap, current slot, lowest live slot, key ttl (s), unit (0 tokens, 1 spend)
-- A grant g holds fixed + g * cc tokens in every token counter and fixed value + g * rc in every
-- spend counter (cc: completions count, rc: completion price, from the record).
-- Returns {1, granted, completion tokens left after the grant (-1: none bound them)}
--      or {0, 'cap', counter index, used, oldest slot} or {0, 'concurrency', live count}
--      or {0, 'moved'} (the user left this home) or {0, 'moving'} (the user is entering it).
-- Refuses (CAPGATE_ARG error, nothing written) a negative or non-integer number, a grant range
-- with want_max < want_min, or counter arguments that are not five per counter.
-- Invariant: for every counter, sum of live slots <= cap after a grant; every held token and
-- nano-unit is in exactly one record's grants, and every grant is >= 0; all keys share one hash
-- slot (the user's home).
local res, live, totals, ledger, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local fixed, want_min = int_arg(4, 0, 'fixed'), int_arg(5, 0, 'want_min')
local want_max = int_arg(6, want_min, 'want_max')
local max_live = int_arg(7, 0, 'concurrency limit')
local vfixed = int_arg(9, 0, 'fixed value')
need(#ARGV - 9 == (#KEYS - 5) * 5, 'five counter arguments per counter key')
window_args(10, 5)

reap_expired(res, live, totals, ledger, settled, now)

local existing = redis.call('HGET', res, rid)
if existing then
  local rec = cjson.decode(existing)
  return {1, rec.g or (rec.held - fixed), 0}
end

local marks = redis.call('HMGET', res, '~moved', '~moving')
if marks[1] then return {0, 'moved'} end
if marks[2] and tonumber(marks[2]) > now then return {0, 'moving'} end

if max_live > 0 then
  local n = redis.call('ZCARD', live)
  if n >= max_live then return {0, 'concurrency', n} end
end

local rec = cjson.decode(ARGV[8])
local cc, rc = rec.cc, rec.rc
local most, binding, bused, boldest, slots, vslots = room_for(10, #KEYS - 5, 5, fixed, vfixed, cc, rc)
local grant = want_max
if most ~= nil then grant = math.min(want_max, most) end
if grant < want_min then
  return {0, 'cap', binding, bused, boldest}
end

local ttl = 0
for w = 1, #KEYS - 5 do ttl = math.max(ttl, tonumber(ARGV[10 + (w - 1) * 5 + 3])) end
local held, hv = fixed + grant * cc, vfixed + grant * rc
add_to_slots(slots, held, ttl)
add_to_slots(vslots, hv, ttl)

rec.held, rec.hv, rec.g = held, hv, grant
rec.grants = {{n = held, v = hv, slots = slots, vslots = vslots}}
rec.op, rec.oca, rec.oc, rec.created, rec.ttl = 0, 0, 0, now, ttl
redis.call('HSET', res, rid, cjson.encode(rec))
redis.call('ZADD', live, expires, rid)
local left = -1
if most ~= nil then left = most - grant end
return {1, grant, left}
