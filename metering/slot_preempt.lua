-- slot_preempt: choose the stream to end for a request that finds no slot: over the given
-- upstreams, the preemptible request of the worst (highest) priority, worse than the starved
-- request's, whose slot has not expired. Whichever replica holds it ends it (slot_preempted).
--
-- KEYS[i]      slots      zset of upstream i: request id -> slot expiry (ms)
-- KEYS[n+i]    victims    zset of upstream i: preemptible request id -> priority
-- KEYS[2n+1]   preempted  zset: request id asked to end -> notice expiry (ms)
-- ARGV[1] the starved request's priority   ARGV[2] now (ms)   ARGV[3] notice expiry (ms)
-- Returns {i, request id} for the request chosen on upstream i, or {0} when there is none.
-- Invariant: a request is chosen at most once (it leaves its victims zset); victims whose slot is
-- gone (freed, or its replica died) are dropped, never chosen.
local n = (#KEYS - 1) / 2
need(n >= 1 and n == math.floor(n), 'a slots and a victims key per upstream, then the preempted key')
local priority = tonumber(ARGV[1])
need(priority ~= nil and priority == math.floor(priority), 'priority must be an integer')
local now, expires = int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local preempted = KEYS[2 * n + 1]
redis.call('ZREMRANGEBYSCORE', preempted, '-inf', now)

local best, best_rid, best_rank = 0, nil, nil
for i = 1, n do
  local victims = KEYS[n + i]
  while true do
    local top = redis.call('ZREVRANGEBYSCORE', victims, '+inf', '(' .. priority, 'WITHSCORES', 'LIMIT', 0, 1)
    if #top == 0 then break end
    local expiry = redis.call('ZSCORE', KEYS[i], top[1])
    if expiry and tonumber(expiry) > now then
      local rank = tonumber(top[2])
      if best_rank == nil or rank > best_rank then best, best_rid, best_rank = i, top[1], rank end
      break
    end
    redis.call('ZREM', victims, top[1])
  end
end
if best == 0 then return {0} end
redis.call('ZREM', KEYS[n + best], best_rid)
redis.call('ZADD', preempted, expires, best_rid)
return {best, best_rid}
