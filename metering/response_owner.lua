-- response_owner: the record `response_own` wrote for a stored response.
--
-- KEYS[1] owner  hash of one response id (see response_own.lua)
-- Returns {user, upstream url, prompt tokens, output bound}, or {} when there is none.
-- Invariant: reads only.
local found = redis.call('HMGET', KEYS[1], 'u', 'up', 'pt', 'ob')
if not found[1] then return {} end
return found
