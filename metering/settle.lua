-- settle: charge a request's real usage exactly once, return the rest of its reservation, and
-- append its usage event to the ledger.
--
-- KEYS[1] res      hash   request id -> reservation record (JSON)
-- KEYS[2] live     zset   request id -> lease expiry (ms)
-- KEYS[3] totals   hash   the user's running totals (overall and per tier)
-- KEYS[4] ledger   stream the user's usage events
-- KEYS[5] settled  zset   request ids already settled (or reaped) -> time (ms)
-- KEYS[6..] the user's window hashes (used only when no reservation exists: fail-open replay)
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] counted tokens (against caps)
-- ARGV[4] prompt   ARGV[5] cached   ARGV[6] completion   ARGV[7] value (nano)   ARGV[8] tier
-- ARGV[9] number of event field/value pairs, then the pairs, then per window: current slot,
--         key ttl (s)
-- Returns 'ok', 'late' (reaped before; only the difference was added) or 'duplicate'.
-- Invariant: a request id is charged at most once in full: settle and reap never both count.
local res, live, totals, ledger, settled = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid, now, counted = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local prompt, cached, completion = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local value, tier = tonumber(ARGV[7]), ARGV[8]
local npairs = tonumber(ARGV[9])
local event = {}
for i = 10, 9 + npairs * 2 do event[#event + 1] = ARGV[i] end

local function append_event(fields)
  redis.call('XADD', ledger, '*', unpack(fields))
end

local raw = redis.call('HGET', res, rid)
local rec = nil
if raw then rec = cjson.decode(raw) end

if redis.call('ZSCORE', settled, rid) then
  if rec == nil or rec.state ~= 'reaped' then return 'duplicate' end
  -- Reaped earlier at what was observed then: add only what came after.
  local dp, dc = math.max(0, prompt - rec.op), math.max(0, completion - rec.oc)
  settle_grants(rec, rec.held + dp * rec.cp + dc * rec.cc)
  local dvalue = dp * rec.rp + dc * rec.rc
  add_totals(totals, tier, dp, 0, dc, dvalue)
  redis.call('HINCRBY', totals, 'requests', -1)
  redis.call('HINCRBY', totals, 'tier:' .. tier .. ':requests', -1)
  local late = {}
  for i = 1, #event, 2 do
    local k, v = event[i], event[i + 1]
    if k == 'prompt_tokens' then v = dp elseif k == 'cached_tokens' then v = 0
    elseif k == 'completion_tokens' then v = dc elseif k == 'value_nano' then v = dvalue
    elseif k == 'finish_reason' then v = v .. '+late' end
    late[#late + 1] = k
    late[#late + 1] = v
  end
  append_event(late)
  redis.call('HDEL', res, rid)
  return 'late'
end

if rec then
  settle_grants(rec, counted)
  redis.call('ZREM', live, rid)
  redis.call('HDEL', res, rid)
else
  local slots = {}
  local ttl = 0
  local base = 10 + npairs * 2
  for w = 1, #KEYS - 5 do
    slots[#slots + 1] = KEYS[5 + w]
    slots[#slots + 1] = ARGV[base + (w - 1) * 2]
    ttl = math.max(ttl, tonumber(ARGV[base + (w - 1) * 2 + 1]))
  end
  add_to_slots(slots, counted, ttl)
end
add_totals(totals, tier, prompt, cached, completion, value)
append_event(event)
mark_settled(res, settled, rid, now)
return 'ok'
