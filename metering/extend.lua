-- extend: grant a running request more completion tokens (a lease), record what was observed so
-- far and push its lease expiry out. With want 0 it only records and refreshes.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3..] the user's window hashes, in the order the proxy computed them
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] new lease expiry (ms)
-- ARGV[4] least grant accepted   ARGV[5] tokens wanted
-- ARGV[6] prompt tokens observed   ARGV[7] of which cached   ARGV[8] completion tokens observed
-- ARGV[9..] per window: cap, current slot, lowest live slot, key ttl (s)
-- Returns {granted, left after grant (-1: no window caps)}, or {-1, 0} when the reservation is gone (reaped/settled).
-- Refuses (CAPGATE_ARG error, nothing written) negative or non-integer numbers, want_max < want_min.
-- Invariant: as reserve.lua: no window's live sum exceeds its cap because of a grant; grants are >= 0.
local res, live = KEYS[1], KEYS[2]
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local want_min = int_arg(4, 0, 'want_min')
local want_max = int_arg(5, want_min, 'want_max')
local prompt, cached, completion = int_arg(6, 0, 'prompt'), int_arg(7, 0, 'cached'), int_arg(8, 0, 'completion')
need(cached <= prompt, 'cached tokens are part of the prompt tokens')
need(#ARGV - 8 == (#KEYS - 2) * 4, 'four window arguments per window key')
window_args(9, 4)

local raw = redis.call('HGET', res, rid)
if not raw then return {-1, 0} end
local rec = cjson.decode(raw)
if rec.state == 'reaped' then return {-1, 0} end
rec.op = math.max(rec.op, prompt)
rec.oca = math.max(rec.oca or 0, cached)
rec.oc = math.max(rec.oc, completion)
redis.call('ZADD', live, expires, rid)

local grant, left = 0, -1
if want_max > 0 then
  local nwin = #KEYS - 2
  local room = nil
  for w = 1, nwin do
    local base = 9 + (w - 1) * 4
    local used = window_used(KEYS[2 + w], tonumber(ARGV[base + 2]))
    local l = tonumber(ARGV[base]) - used
    if room == nil or l < room then room = l end
  end
  grant = want_max
  if room ~= nil then grant = math.min(want_max, room) end
  if grant < want_min then
    grant = 0
  else
    local slots = {}
    for w = 1, nwin do
      slots[#slots + 1] = KEYS[2 + w]
      slots[#slots + 1] = ARGV[9 + (w - 1) * 4 + 1]
    end
    add_to_slots(slots, grant, rec.ttl)
    rec.held = rec.held + grant
    rec.grants[#rec.grants + 1] = {n = grant, slots = slots}
  end
  if room ~= nil then left = room - grant end
end
redis.call('HSET', res, rid, cjson.encode(rec))
return {grant, left}
