-- exporter_lock: take or keep one export shard for one exporter instance.
--
-- KEYS[1] lock     string the instance holding the shard
-- ARGV[1] instance token   ARGV[2] time to live (ms)
-- Returns 1 when the caller holds the shard for ARGV[2] ms from now, else 0.
-- Invariant: at most one instance holds a shard at a time (while its lock lives).
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', int_arg(2, 1, 'ttl'))
return 1
