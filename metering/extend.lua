-- extend: grant a running request more completion tokens (a lease), record what was observed so
-- far and push its lease expiry out. With want 0 it only records and refreshes.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON); the home's move markers
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3..] the request's counters, in the order the proxy computed them (as reserve.lua)
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] new lease expiry (ms)
-- ARGV[4] least grant accepted   ARGV[5] tokens wanted
-- ARGV[6] prompt tokens observed   ARGV[7] of which cached   ARGV[8] completion tokens observed
-- ARGV[9..] per counter: cap, current slot, lowest live slot, key ttl (s), unit (0 tokens, 1 spend)
-- Returns {granted, completion tokens left after the grant (-1: none bound them)}, or {-1, 0}
-- when the reservation is gone (reaped/settled) or, for a grant, the user left this home.
-- Refuses (CAPGATE_ARG error, nothing written) negative or non-integer numbers, want_max < want_min.
-- Invariant: as reserve.lua: no counter's live sum exceeds its cap because of a grant; grants
-- are >= 0; a user who left this home gets no more grants here.
local res, live = KEYS[1], KEYS[2]
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local want_min = int_arg(4, 0, 'want_min')
local want_max = int_arg(5, want_min, 'want_max')
local prompt, cached, completion = int_arg(6, 0, 'prompt'), int_arg(7, 0, 'cached'), int_arg(8, 0, 'completion')
need(cached <= prompt, 'cached tokens are part of the prompt tokens')
need(#ARGV - 8 == (#KEYS - 2) * 5, 'five counter arguments per counter key')
window_args(9, 5)

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
  if moved(res) then
    redis.call('HSET', res, rid, cjson.encode(rec))
    return {-1, 0}
  end
  local most, _, _, _, slots, vslots = room_for(9, #KEYS - 2, 2, 0, 0, rec.cc, rec.rc)
  grant = want_max
  if most ~= nil then grant = math.min(want_max, most) end
  if grant < want_min then
    grant = 0
  else
    local n, v = grant * rec.cc, grant * rec.rc
    add_to_slots(slots, n, rec.ttl)
    add_to_slots(vslots, v, rec.ttl)
    rec.held, rec.hv = rec.held + n, (rec.hv or 0) + v
    rec.g = (rec.g or 0) + grant
    rec.grants[#rec.grants + 1] = {n = n, v = v, slots = slots, vslots = vslots}
  end
  if most ~= nil then left = math.max(most - grant, 0) end
end
redis.call('HSET', res, rid, cjson.encode(rec))
return {grant, left}
