-- reserve: hold tokens for one request across all of a user's windows, atomically.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms); its size is the user's concurrency
-- KEYS[3] totals   hash   the user's running totals (overall and per tier)
-- KEYS[4] ledger   stream the user's usage events
-- KEYS[5] settled  zset   request ids already settled (or reaped) -> time (ms)
-- KEYS[6..] one hash per capped window of the user
-- ARGV[1] request id      ARGV[2] now (ms)          ARGV[3] lease expiry (ms)
-- ARGV[4] fixed tokens (the counted prompt bound)   ARGV[5] least completion grant worth serving
-- ARGV[6] completion tokens wanted                  ARGV[7] concurrency limit (0 = none)
-- ARGV[8] record JSON (user, tier, model, prices, counting flags), completed here
-- ARGV[9..] per window: cap, current slot, lowest live slot, key ttl (s)
-- Returns {1, granted, left after grant (-1: no window caps)} or {0, 'cap', window index, used, oldest slot}
--      or {0, 'concurrency', live count}.
-- Refuses (CAPGATE_ARG error, nothing written) a negative or non-integer number, a grant range
-- with want_max < want_min, or window arguments that are not four per window.
-- Invariant: for every window, sum of live slots <= cap after a grant; every held token is in
-- exactly one record's grants, and every grant is >= 0; the user's keys share one hash slot ({u:ID}).
local res, live, totals, ledger, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local fixed, want_min = int_arg(4, 0, 'fixed'), int_arg(5, 0, 'want_min')
local want_max = int_arg(6, want_min, 'want_max')
local max_live = int_arg(7, 0, 'concurrency limit')
need(#ARGV - 8 == (#KEYS - 5) * 4, 'four window arguments per window key')
window_args(9, 4)

reap_expired(res, live, totals, ledger, settled, now)

local existing = redis.call('HGET', res, rid)
if existing then
  local rec = cjson.decode(existing)
  return {1, rec.held - fixed, 0}
end

if max_live > 0 then
  local n = redis.call('ZCARD', live)
  if n >= max_live then return {0, 'concurrency', n} end
end

local nwin = #KEYS - 5
local room, binding, binding_used, binding_oldest = nil, 0, 0, false
for w = 1, nwin do
  local base = 9 + (w - 1) * 4
  local cap, lo = tonumber(ARGV[base]), tonumber(ARGV[base + 2])
  local used, oldest = window_used(KEYS[5 + w], lo)
  local left = cap - used
  if room == nil or left < room then
    room, binding, binding_used, binding_oldest = left, w, used, oldest or false
  end
end

local grant = want_max
if room ~= nil then grant = math.min(want_max, room - fixed) end
if grant < want_min then
  return {0, 'cap', binding, binding_used, binding_oldest}
end

local slots = {}
for w = 1, nwin do
  local base = 9 + (w - 1) * 4
  slots[#slots + 1] = KEYS[5 + w]
  slots[#slots + 1] = ARGV[base + 1]
end
local ttl = 0
for w = 1, nwin do ttl = math.max(ttl, tonumber(ARGV[9 + (w - 1) * 4 + 3])) end
add_to_slots(slots, fixed + grant, ttl)

local rec = cjson.decode(ARGV[8])
rec.held = fixed + grant
rec.grants = {{n = fixed + grant, slots = slots}}
rec.op, rec.oca, rec.oc, rec.created, rec.ttl = 0, 0, 0, now, ttl
redis.call('HSET', res, rid, cjson.encode(rec))
redis.call('ZADD', live, expires, rid)
local left = -1
if room ~= nil then left = room - fixed - grant end
return {1, grant, left}
