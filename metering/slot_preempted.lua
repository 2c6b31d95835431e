-- slot_preempted: which of one process's preemptible requests it is asked to end (by the replica
-- of a starved request, through slot_preempt); each notice is handed out once.
--
-- KEYS[1] preempted  zset: request id asked to end -> notice expiry (ms)
-- ARGV[1] now (ms)   ARGV[2..] the process's preemptible request ids
-- Returns the ids among them asked to end, and removes their notices.
local now = int_arg(1, 0, 'now')
local asked = {}
for i = 2, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry then
    redis.call('ZREM', KEYS[1], ARGV[i])
    if tonumber(expiry) > now then asked[#asked + 1] = ARGV[i] end
  end
end
return asked
