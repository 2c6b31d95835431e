-- settle: charge a request's real usage exactly once, return the rest of its reservation, append
-- its usage event to the ledger, and notify the thresholds of a window's cap it made usage cross.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3] totals   hash   the user's running totals (overall and per tier)
-- KEYS[4] ledger   stream the user's usage events (and threshold notifications)
-- KEYS[5] settled  zset   request ids already settled (or reaped) -> time (ms)
-- KEYS[6] notices  stream the user's threshold notifications, for delivery
-- KEYS[7..] the request's counters (as reserve.lua; their slots are used only when no
--         reservation exists: fail-open replay); each with `<key>:c` (committed usage per slot)
--         and `<key>:n` (threshold -> the slot it was last notified in) when thresholds are set
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] counted tokens (against caps)
-- ARGV[4] prompt   ARGV[5] cached   ARGV[6] completion   ARGV[7] value (nano)   ARGV[8] tier
-- ARGV[9] number of event field/value pairs, then the pairs; then the number of thresholds and
--         the thresholds (thousandths of a cap, ascending); then each counter's window name;
--         then per counter: current slot, key ttl (s), unit (0 tokens, 1 spend), lowest live
--         slot, slots between two notifications of one threshold, cap, team (0 or 1)
-- Returns 'ok', 'late' (reaped before: the reaper's event is replaced by this one, which names it
-- in `replaces` for an exported copy, and only the difference is added to caps and totals) or
-- 'duplicate'.
-- Refuses (CAPGATE_ARG error, nothing written) negative or non-integer numbers, cached > prompt.
-- Invariant: a request id is charged at most once in full (settle and reap never both count) and
-- has at most one event in the ledger; its spend counters are charged its exact value; a
-- threshold of a counter is notified at most once per its spacing of slots, by the settlement
-- whose charge took committed usage from below it to at or above it.
local res, live, totals, ledger, settled, notices = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local rid, now, counted = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'counted')
local prompt, cached, completion = int_arg(4, 0, 'prompt'), int_arg(5, 0, 'cached'), int_arg(6, 0, 'completion')
local value, tier = int_arg(7, 0, 'value'), ARGV[8]
local npairs = int_arg(9, 0, 'event pairs')
local ncounters = #KEYS - 6
local nat = 10 + npairs * 2
local nthresholds = int_arg(nat, 0, 'thresholds')
local names = nat + nthresholds + 1
local nums = names + ncounters
need(cached <= prompt, 'cached tokens are part of the prompt tokens')
need(#ARGV - nums + 1 == ncounters * 7, 'seven counter arguments per counter key')
window_args(nums, 7)
local thresholds = {}
for i = nat + 1, nat + nthresholds do thresholds[#thresholds + 1] = int_arg(i, 1, 'threshold') end
local event = {}
for i = 10, 9 + npairs * 2 do event[#event + 1] = ARGV[i] end

-- The part of an integer cap at `share` thousandths, rounded up (exact for caps below 2^53).
local function mark_of(cap, share)
  return math.floor(cap / 1000) * share + math.ceil((cap % 1000) * share / 1000)
end

-- Add this settlement's charge to each counter's committed usage, and notify each threshold it
-- crossed (once per spacing of slots).
local function notify_crossings()
  if nthresholds == 0 then return end
  local user = ''
  for i = 1, #event, 2 do
    if event[i] == 'user' then user = event[i + 1] end
  end
  for w = 1, ncounters do
    local at = nums + (w - 1) * 7
    local slot, ttl, unit = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    local lo, spacing = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    local cap, team = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
    local charged = counted
    if unit == 1 then charged = value end
    if charged > 0 and cap > 0 then
      local key = KEYS[6 + w]
      redis.call('HINCRBY', key .. ':c', ARGV[at], charged)
      redis.call('EXPIRE', key .. ':c', ttl)
      local after = window_used(key .. ':c', lo)
      local before = after - charged
      for _, share in ipairs(thresholds) do
        local mark = mark_of(cap, share)
        local crossed = before < mark and after >= mark
        local last = crossed and tonumber(redis.call('HGET', key .. ':n', share))
        if crossed and (last == nil or slot - last >= spacing) then
          redis.call('HSET', key .. ':n', share, slot)
          redis.call('EXPIRE', key .. ':n', ttl)
          local scope, units = 'user', 'tokens'
          if team == 1 then scope = 'team' end
          if unit == 1 then units = 'spend' end
          local note = {'kind', 'threshold', 'user', user, 'window', ARGV[names + w - 1], 'scope', scope, 'unit', units,
            'share', share, 'cap', cap, 'used', after, 'period', slot, 'request_id', rid, 'ts_ms', now}
          redis.call('XADD', ledger, '*', unpack(note))
          redis.call('XADD', notices, '*', unpack(note))
        end
      end
    end
  end
end

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
  for w = 1, ncounters do
    local at = nums + (w - 1) * 7
    local list = slots
    if tonumber(ARGV[at + 2]) == 1 then list = vslots end
    list[#list + 1] = KEYS[6 + w]
    list[#list + 1] = ARGV[at]
    ttl = math.max(ttl, tonumber(ARGV[at + 1]))
  end
  add_to_slots(slots, counted, ttl)
  add_to_slots(vslots, value, ttl)
end
add_totals(totals, tier, 1, prompt, cached, completion, value)
redis.call('XADD', ledger, '*', unpack(event))
notify_crossings()
mark_settled(res, settled, rid, now)
return 'ok'
