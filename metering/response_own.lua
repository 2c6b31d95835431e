-- response_own: record who created a stored response, where it is stored, and what it cost.
-- vLLM keeps stored responses without knowing users; this record is what lets capgate give a
-- response (retrieve, cancel, input items, `previous_response_id`) to its creator only.
--
-- KEYS[1] owner  hash of one response id: u (user), up (upstream url), pt (its prompt tokens),
--                ob (a bound of the tokens its output adds to a continuation), -1 while unknown
-- ARGV[1] user   ARGV[2] upstream url   ARGV[3] prompt tokens   ARGV[4] output bound
-- ARGV[5] seconds the record is kept
-- Returns 1 when written, 0 when the id belongs to another user (nothing written).
-- Refuses (CAPGATE_ARG error) token counts below -1 and a time to keep below 1.
-- Invariant: a response id, once owned, never changes owner while its record lives.
local pt, ob = int_arg(3, -1, 'prompt tokens'), int_arg(4, -1, 'output bound')
local keep = int_arg(5, 1, 'seconds kept')
local owner = redis.call('HGET', KEYS[1], 'u')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'up', ARGV[2], 'pt', pt, 'ob', ob)
redis.call('EXPIRE', KEYS[1], keep)
return 1
