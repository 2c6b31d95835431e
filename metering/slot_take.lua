-- slot_take: count a request as running on one upstream: of those with a slot free for the
-- request's tier, the one with the most slots free (the first in the caller's order on a tie). Every capgate replica (and worker) counts in these keys,
-- so what they send to one vLLM at once is known exactly, whoever sent it.
--
-- KEYS[i]   slots  zset of upstream i: request id -> slot expiry (ms); its size is capgate's count
--                  of requests running or queued there
-- ARGV[1]   request id      ARGV[2] now (ms)      ARGV[3] slot expiry (ms)
-- ARGV[3+i] the most requests upstream i may hold once this one is counted (0: no slot for it)
-- Returns {i, size of upstream i} for the upstream taken, or {0, size of upstream 1, ...}.
-- A request already counted on upstream i gets {i, size} again: a retried take is not counted twice.
-- Refuses (CAPGATE_ARG error, nothing written) a non-integer or negative number, or a limit
-- missing for a key.
-- Invariant: no take makes an upstream's size exceed the limit it was given; members whose slot
-- expired (a replica that died holding them) are dropped before counting.
local rid, now, expires = ARGV[1], int_arg(2, 0, 'now'), int_arg(3, 0, 'expiry')
need(#ARGV == 3 + #KEYS, 'one limit per key')
local limits = {}
for i = 1, #KEYS do limits[i] = int_arg(3 + i, 0, 'limit ' .. i) end

local sizes = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  sizes[i] = redis.call('ZCARD', KEYS[i])
  if redis.call('ZSCORE', KEYS[i], rid) then return {i, sizes[i]} end
end
local best, room = 0, 0
for i = 1, #KEYS do
  if limits[i] - sizes[i] > room then best, room = i, limits[i] - sizes[i] end
end
if best > 0 then
  redis.call('ZADD', KEYS[best], expires, rid)
  return {best, sizes[best] + 1}
end
local reply = {0}
for i = 1, #KEYS do reply[i + 1] = sizes[i] end
return reply
