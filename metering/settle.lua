-- settle: charge a request's real usage exactly once, return the rest of its reservation, and
-- append its usage event to the ledger.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3] totals   hash   the user's running totals (overall and per tier)
-- KEYS[4] ledger   stream the user's usage events
-- KEYS[5] settled  zset   request ids already settled (or reaped) -> time (ms)
-- KEYS[6..] the request's counters (as reserve.lua; used only when no reservation exists:
--         fail-open replay)
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] counted tokens (against caps)
-- ARGV[4] prompt   ARGV[5] cached   ARGV[6] completion   ARGV[7] value (nano)   ARGV[8] tier
-- ARGV[9] number of event field/value pairs, then the pairs, then per counter: current slot,
--         key ttl (s), unit (0 tokens, 1 spend)
-- Returns 'ok', 'late' (reaped before: the reaper's event is replaced by this one, which names it
-- in `replaces` for an exported copy, and only the difference is added to caps and totals) or
-- 'duplicate'.
-- Refuses (CAPGATE_ARG error, nothing written) negative or non-integer numbers, cached > prompt.
-- Invariant: a request id is charged at most once in full (settle and reap never both count) and
-- has at most one event in the ledger; its spend counters are charged its exact value.
local res, live, totals, ledger, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid, now, counted = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'counted')
local prompt, cached, completion = int_arg(4, 0, 'prompt'), int_arg(5, 0, 'cached'), int_arg(6, 0, 'completion')
local value, tier = int_arg(7, 0, 'value'), ARGV[8]
local npairs = int_arg(9, 0, 'event pairs')
need(cached <= prompt, 'cached tokens are part of the prompt tokens')
need(#ARGV - 9 - npairs * 2 == (#KEYS - 5) * 3, 'three counter arguments per counter key')
window_args(10 + npairs * 2, 3)
local event = {}
for i = 10, 9 + npairs * 2 do event[#event + 1] = ARGV[i] end

local raw = redis.call('HGET', res, rid)
local rec = nil
if raw then rec = cjson.decode(raw) end

if redis.call('ZSCORE', settled, rid) then
  if rec == nil or rec.state ~= 'reaped' then return 'duplicate' end
  -- Reaped earlier at what was observed then: charge what came after, replace the event.
  settle_grants(rec, math.max(counted, rec.held), math.max(value, rec.hv or 0))
  local dp, dca = math.max(0, prompt - rec.op), math.max(0, cached - rec.oca)
  local dc = math.max(0, completion - rec.oc)
  add_totals(totals, tier, 0, dp, dca, dc, math.max(0, value - rec.value))
  if rec.entry then redis.call('XDEL', ledger, rec.entry) end
  event[#event + 1] = 'replaces'
  event[#event + 1] = rec.entry or ''
  redis.call('XADD', ledger, '*', unpack(event))
  redis.call('HDEL', res, rid)
  return 'late'
end

if rec then
  settle_grants(rec, counted, value)
  redis.call('ZREM', live, rid)
  redis.call('HDEL', res, rid)
else
  local slots, vslots = {}, {}
  local ttl = 0
  local base = 10 + npairs * 2
  for w = 1, #KEYS - 5 do
    local at = base + (w - 1) * 3
    local list = slots
    if tonumber(ARGV[at + 2]) == 1 then list = vslots end
    list[#list + 1] = KEYS[5 + w]
    list[#list + 1] = ARGV[at]
    ttl = math.max(ttl, tonumber(ARGV[at + 1]))
  end
  add_to_slots(slots, counted, ttl)
  add_to_slots(vslots, value, ttl)
end
add_totals(totals, tier, 1, prompt, cached, completion, value)
redis.call('XADD', ledger, '*', unpack(event))
mark_settled(res, settled, rid, now)
return 'ok'
