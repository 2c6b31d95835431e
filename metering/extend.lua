-- extend: grant a running request more completion tokens (a lease), record what was observed so
-- far and push its lease expiry out. With want 0 it only records and refreshes.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3..] the user's window hashes, in the order the proxy computed them
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] new lease expiry (ms)
-- ARGV[4] least grant accepted   ARGV[5] tokens wanted
-- ARGV[6] prompt tokens observed   ARGV[7] completion tokens observed
-- ARGV[8..] per window: cap, current slot, lowest live slot, key ttl (s)
-- Returns {granted, left after grant (-1: no window caps)}, or {-1, 0} when the reservation is gone (reaped/settled).
-- Invariant: as reserve.lua: no window's live sum exceeds its cap because of a grant.
local res, live = KEYS[1], KEYS[2]
local rid, now, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local want_min, want_max = tonumber(ARGV[4]), tonumber(ARGV[5])

local raw = redis.call('HGET', res, rid)
if not raw then return {-1, 0} end
local rec = cjson.decode(raw)
if rec.state == 'reaped' then return {-1, 0} end
rec.op = math.max(rec.op, tonumber(ARGV[6]))
rec.oc = math.max(rec.oc, tonumber(ARGV[7]))
redis.call('ZADD', live, expires, rid)

local grant, left = 0, -1
if want_max > 0 then
  local nwin = #KEYS - 2
  local room = nil
  for w = 1, nwin do
    local base = 8 + (w - 1) * 4
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
      slots[#slots + 1] = ARGV[8 + (w - 1) * 4 + 1]
    end
    add_to_slots(slots, grant, rec.ttl)
    rec.held = rec.held + grant
    rec.grants[#rec.grants + 1] = {n = grant, slots = slots}
  end
  if room ~= nil then left = room - grant end
end
redis.call('HSET', res, rid, cjson.encode(rec))
return {grant, left}
