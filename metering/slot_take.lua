-- slot_take: count a request as running on one upstream: of those with a slot free for the
-- request's tier, the one with the most slots free (the first in the caller's order on a tie).
-- Every capgate replica (and worker) counts in these keys, so what they send to one vLLM at once
-- is known exactly, whoever sent it. Replicas holding requests for the same model take turns: a
-- take is refused while another replica waits with a better priority, or the same one for longer
-- (so one replica that frees a slot cannot keep it for its own queue).
--
-- KEYS[i]   slots    zset of upstream i: request id -> slot expiry (ms); its size is capgate's
--                    count of requests running or queued there
-- KEYS[n+i] victims  zset of upstream i: preemptible request id -> its tier's priority (given,
--                    all n of them, only when ARGV[4] is not empty)
-- KEYS[#KEYS] waiting  hash of the model: replica id -> "priority since expiry" (ms) of the
--                    request it holds that goes next
-- ARGV[1] request id      ARGV[2] now (ms)      ARGV[3] slot expiry (ms)
-- ARGV[4] the request's priority if it may be preempted, else ''
-- ARGV[5] replica id      ARGV[6] the request's priority      ARGV[7] waiting record expiry (ms)
-- ARGV[7+i] the most requests upstream i may hold once this one is counted (0: no slot for it)
-- Returns {i, size of upstream i} for the upstream taken, or {0, size of upstream 1, ...} (then
-- the replica's waiting record is set, keeping when it started waiting).
-- A request already counted on upstream i gets {i, size} again: a retried take is not counted twice.
-- Refuses (CAPGATE_ARG error, nothing written) a non-integer or negative number, a non-integer
-- priority, or a limit missing for a key.
-- Invariant: no take makes an upstream's size exceed the limit it was given; members whose slot
-- expired (a replica that died holding them) are dropped before counting, as are waiting records
-- past their expiry.
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
local replica, wait_expires = ARGV[5], int_arg(7, 0, 'waiting expiry')
local priority = tonumber(ARGV[6])
need(priority ~= nil and priority == math.floor(priority), 'priority must be an integer')
local n = #ARGV - 7
local rank = nil
if ARGV[4] ~= '' then
  rank = tonumber(ARGV[4])
  need(rank ~= nil and rank == math.floor(rank), 'preemptible priority must be an integer')
  need(#KEYS == 2 * n + 1, 'a victims key per upstream')
else
  need(#KEYS == n + 1, 'one limit per key')
end
need(n >= 1, 'at least one upstream')
local limits = {}
for i = 1, n do limits[i] = int_arg(7 + i, 0, 'limit ' .. i) end
local waiting = KEYS[#KEYS]

local sizes = {}
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  sizes[i] = redis.call('ZCARD', KEYS[i])
  if redis.call('ZSCORE', KEYS[i], rid) then return {i, sizes[i]} end
end
local best, room = 0, 0
for i = 1, n do
  if limits[i] - sizes[i] > room then best, room = i, limits[i] - sizes[i] end
end

local function record(text)
  local p, since, until_ = string.match(text, '^(%-?%d+) (%d+) (%d+)$')
  return tonumber(p), tonumber(since), tonumber(until_)
end
local since = now
local mine = redis.call('HGET', waiting, replica)
if mine then
  local _, s, e = record(mine)
  if e > now then since = s end
end
local blocked = false
local others = redis.call('HGETALL', waiting)
for j = 1, #others, 2 do
  if others[j] ~= replica then
    local p, s, e = record(others[j + 1])
    if e <= now then
      redis.call('HDEL', waiting, others[j])
    elseif p < priority or (p == priority and s < since) then
      blocked = true
    end
  end
end

if best > 0 and not blocked then
  redis.call('ZADD', KEYS[best], expires, rid)
  if rank then redis.call('ZADD', KEYS[n + best], rank, rid) end
  redis.call('HDEL', waiting, replica)
  return {best, sizes[best] + 1}
end
redis.call('HSET', waiting, replica, string.format('%d %d %d', priority, since, wait_expires))
local reply = {0}
for i = 1, n do reply[i + 1] = sizes[i] end
return reply
