-- Shared helpers, prepended by metering/meter.py to every metering script.
--
-- A counter key is a hash: field = a numeric slot (a calendar period's index, or a rolling
-- bucket's index), value = what is committed (used + held) in that slot: tokens for a token
-- window, nano-units of money for a spend window. Its usage is the sum of its fields in
-- [lo, +inf); fields older than lo - 1 are dropped when touched.
-- A reservation record (JSON in the user's `res` hash) lists its grants, newest last, each with
-- the tokens `n` added to the (key, field) `slots` of the token counters and the value `v` added
-- to the `vslots` of the spend counters, so that refunds and charges land where they were held.
-- `held` and `hv` are the record's tokens and value held; `g` its completion tokens granted.
-- The record carries the request's prices as nano-units per token (`rp` uncached prompt, `rcp`
-- cached prompt, `rc` completion), computed by policies/pricing.py: scripts only apply them.
-- A user's `res` hash also holds their home's move markers: `~moved` (the user left this home:
-- refuse new holds) and `~moving` (until when the user is entering it: hold nothing yet).

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

-- The counter arguments from ARGV[first], `per` values per counter: each a non-negative integer.
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

-- Whether the user left this home (their holds go to their new team's slot now).
local function moved(res)
  return redis.call('HGET', res, '~moved') ~= false
end

-- Room for completion tokens in every counter (ARGV from `first`, five per counter: cap, current
-- slot, lowest live slot, key ttl, unit 0 tokens / 1 spend) after the fixed holds `fixed` tokens
-- and `vfixed` value, at `cc` tokens and `rc` value per completion token. Returns the most
-- completion tokens that fit (nil: no counter bounds them; -1: a fixed hold does not fit), the
-- binding counter's index, its usage and its oldest live slot, and the counters' slot list
-- (token counters, spend counters) to add holds to.
local function room_for(first, nkeys, keybase, fixed, vfixed, cc, rc)
  local most, binding, bused, boldest = nil, 0, 0, false
  local slots, vslots = {}, {}
  for w = 1, nkeys do
    local base = first + (w - 1) * 5
    local key = KEYS[keybase + w]
    local cap, lo, unit = tonumber(ARGV[base]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 4])
    local used, oldest = window_used(key, lo)
    local fix, per, list = fixed, cc, slots
    if unit == 1 then fix, per, list = vfixed, rc, vslots end
    list[#list + 1] = key
    list[#list + 1] = ARGV[base + 1]
    local room = cap - used - fix
    local fits = nil
    if room < 0 then fits = -1 elseif per > 0 then fits = math.floor(room / per) end
    if fits ~= nil and (most == nil or fits < most) then
      most, binding, bused, boldest = fits, w, used, oldest or false
    end
  end
  return most, binding, bused, boldest, slots, vslots
end

-- Add n to every slot of a grant's address list {key1, field1, key2, field2, ...}.
local function add_to_slots(slots, n, ttl)
  for i = 1, #slots, 2 do
    redis.call('HINCRBY', slots[i], slots[i + 1], n)
    redis.call('EXPIRE', slots[i], ttl)
  end
end

-- Move one part of a reservation (tokens: amount `n` on `slots`; value: `v` on `vslots`) from
-- `held` to `actual`: refund the excess from the newest grants back, or charge the shortfall to
-- the newest grant's slots.
local function settle_part(grants, held, actual, amount, where)
  local excess = held - actual
  if excess < 0 then
    local slots = grants[#grants][where] or {}
    for i = 1, #slots, 2 do
      redis.call('HINCRBY', slots[i], slots[i + 1], -excess)
    end
    return
  end
  for g = #grants, 1, -1 do
    if excess == 0 then return end
    local grant = grants[g]
    local take = math.min(excess, grant[amount] or 0)
    if take > 0 then
      local slots = grant[where] or {}
      for i = 1, #slots, 2 do
        if redis.call('HEXISTS', slots[i], slots[i + 1]) == 1 then
          redis.call('HINCRBY', slots[i], slots[i + 1], -take)
        end
      end
      excess = excess - take
    end
  end
end

-- Move a reservation from what it holds to what it used: `counted` tokens and `value`.
local function settle_grants(rec, counted, value)
  settle_part(rec.grants, rec.held, counted, 'n', 'slots')
  settle_part(rec.grants, rec.hv or 0, value, 'v', 'vslots')
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
      local value = value_of(rec, rec.op, rec.oca, rec.oc)
      settle_grants(rec, counted, value)
      add_totals(totals, rec.t, 1, rec.op, rec.oca, rec.oc, value)
      rec.entry = redis.call('XADD', ledger, '*', 'request_id', rid, 'user', rec.u, 'tier', rec.t,
        'model', rec.m, 'prompt_tokens', rec.op, 'cached_tokens', rec.oca,
        'completion_tokens', rec.oc, 'value_nano', value, 'finish_reason', 'expired',
        'ttft_ms', '', 'duration_ms', now - rec.created, 'ts_ms', now)
      rec.state = 'reaped'
      rec.held = counted
      rec.hv = value
      rec.value = value
      redis.call('HSET', res, rid, cjson.encode(rec))
      mark_settled(res, settled, rid, now)
    end
  end
  return #expired
end

-- Account scripts (account_*.lua): every account key is `ARGV[1]` (the prefix `cg:{acct}:`)
-- followed by a name, so all of them share one hash slot. A change that a replica's cache must
-- see is appended to the `changes` stream with the next number of `seq`: replicas read it to
-- evict what changed, and a gap in the numbers tells them to drop their whole cache.
local function account_changed(prefix, kind, id)
  local seq = redis.call('INCR', prefix .. 'seq')
  redis.call('XADD', prefix .. 'changes', 'MAXLEN', '~', 100000, '*', 'seq', seq, 'kind', kind, 'id', id)
end
