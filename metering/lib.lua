-- Shared helpers, prepended by metering/scripts.py to every metering script.
--
-- A window key is a hash: field = a numeric slot (a calendar period's index, or a rolling
-- bucket's index), value = tokens committed (used + held) in that slot. A window's usage is the
-- sum of its fields in [lo, +inf); fields older than lo - 1 are dropped when touched.
-- A reservation record (JSON in the user's `res` hash) lists its grants, newest last, each with
-- the (key, field) slots it was added to, so that refunds and charges land where they were held.
-- The record carries the request's prices as nano-units per token (`rp` uncached prompt, `rcp`
-- cached prompt, `rc` completion), computed by policies/pricing.py: scripts only apply them.

-- Refuse an argument that would break a script's invariant (a caller's bug) before any write:
-- the reply is an error starting with CAPGATE_ARG.
local function need(ok, what)
  if not ok then error({err = 'CAPGATE_ARG ' .. what}) end
end

-- ARGV[i] as an integer >= lo, or a refusal naming it.
local function int_arg(i, lo, name)
  local n = tonumber(ARGV[i])
  need(n ~= nil and n == math.floor(n) and n >= lo, name .. ' must be an integer >= ' .. lo)
  return n
end

-- The window arguments from ARGV[first], `per` values per window: each a non-negative integer.
local function window_args(first, per)
  for i = first, #ARGV do int_arg(i, 0, 'window argument ' .. (math.floor((i - first) / per) + 1)) end
end

local function value_of(rec, prompt, cached, completion)
  return (prompt - cached) * rec.rp + cached * rec.rcp + completion * rec.rc
end

local function window_used(key, lo)
  local flat = redis.call('HGETALL', key)
  local used, oldest = 0, nil
  for i = 1, #flat, 2 do
    local slot = tonumber(flat[i])
    local n = tonumber(flat[i + 1])
    if slot >= lo then
      used = used + n
      if n > 0 and (oldest == nil or slot < oldest) then oldest = slot end
    elseif slot < lo - 1 then
      redis.call('HDEL', key, flat[i])
    end
  end
  return used, oldest
end

-- Add n tokens to every slot of a grant's address list {key1, field1, key2, field2, ...}.
local function add_to_slots(slots, n, ttl)
  for i = 1, #slots, 2 do
    redis.call('HINCRBY', slots[i], slots[i + 1], n)
    redis.call('EXPIRE', slots[i], ttl)
  end
end

-- Move a reservation from `held` to `counted`: refund the excess from the newest grants back,
-- or charge the shortfall to the newest grant's slots.
local function settle_grants(rec, counted)
  local excess = rec.held - counted
  if excess < 0 then
    local last = rec.grants[#rec.grants]
    for i = 1, #last.slots, 2 do
      redis.call('HINCRBY', last.slots[i], last.slots[i + 1], -excess)
    end
    return
  end
  for g = #rec.grants, 1, -1 do
    if excess == 0 then return end
    local grant = rec.grants[g]
    local take = math.min(excess, grant.n)
    if take > 0 then
      for i = 1, #grant.slots, 2 do
        if redis.call('HEXISTS', grant.slots[i], grant.slots[i + 1]) == 1 then
          redis.call('HINCRBY', grant.slots[i], grant.slots[i + 1], -take)
        end
      end
      excess = excess - take
    end
  end
end

local function add_totals(totals, tier, requests, prompt, cached, completion, value)
  for _, prefix in ipairs({'', 'tier:' .. tier .. ':'}) do
    redis.call('HINCRBY', totals, prefix .. 'requests', requests)
    redis.call('HINCRBY', totals, prefix .. 'prompt_tokens', prompt)
    redis.call('HINCRBY', totals, prefix .. 'cached_tokens', cached)
    redis.call('HINCRBY', totals, prefix .. 'completion_tokens', completion)
    redis.call('HINCRBY', totals, prefix .. 'value_nano', value)
  end
end

local SETTLED_KEEP_MS = 7 * 24 * 3600 * 1000

local function mark_settled(res, settled, rid, now)
  redis.call('ZADD', settled, now, rid)
  local old = redis.call('ZRANGEBYSCORE', settled, '-inf', now - SETTLED_KEEP_MS)
  for _, gone in ipairs(old) do redis.call('HDEL', res, gone) end
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', now - SETTLED_KEEP_MS)
end

-- Reap the user's reservations whose lease expired before `now`: charge what was last observed,
-- refund the rest, write a ledger event, and keep a tombstone (with the event's stream id) so
-- that a late settle replaces that event and adds only the difference. Returns the number reaped.
local function reap_expired(res, live, totals, ledger, settled, now)
  local expired = redis.call('ZRANGEBYSCORE', live, '-inf', now - 1)
  for _, rid in ipairs(expired) do
    local raw = redis.call('HGET', res, rid)
    redis.call('ZREM', live, rid)
    if raw then
      local rec = cjson.decode(raw)
      local counted = rec.op * rec.cp + rec.oc * rec.cc
      settle_grants(rec, counted)
      local value = value_of(rec, rec.op, rec.oca, rec.oc)
      add_totals(totals, rec.t, 1, rec.op, rec.oca, rec.oc, value)
      rec.entry = redis.call('XADD', ledger, '*', 'request_id', rid, 'user', rec.u, 'tier', rec.t,
        'model', rec.m, 'prompt_tokens', rec.op, 'cached_tokens', rec.oca,
        'completion_tokens', rec.oc, 'value_nano', value, 'finish_reason', 'expired',
        'ttft_ms', '', 'duration_ms', now - rec.created, 'ts_ms', now)
      rec.state = 'reaped'
      rec.held = counted
      rec.value = value
      redis.call('HSET', res, rid, cjson.encode(rec))
      mark_settled(res, settled, rid, now)
    end
  end
  return #expired
end
