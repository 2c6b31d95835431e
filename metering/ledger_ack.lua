-- ledger_ack: drop from a user's ledger stream the events a sink now holds durably.
--
-- KEYS[1] ledger   stream the user's usage events
-- ARGV[1] the last entry id exported (ms-seq): every entry up to it is held by the sink
-- Returns the number of events left; the stream is deleted when none are (an exporter's scan then
-- skips users with nothing to export).
-- Invariant: only entries at or before ARGV[1] are removed, so an event settled while the sink was
-- writing stays for the next pass.
local ms, seq = string.match(ARGV[1], '^(%d+)-(%d+)$')
need(ms ~= nil, 'an entry id ms-seq')
redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
local left = redis.call('XLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
return left
