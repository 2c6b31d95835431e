-- account_key: add or revoke an API key of a user account, or record when keys were last used
-- (lib.lua: account keys and changes). Keys are stored by their SHA-256 only.
--
-- KEYS[1] the account changes stream (routes the call to the accounts' hash slot)
-- ARGV[1] key prefix   ARGV[2] op: add | revoke | touch
-- add:    ARGV[3] user id  ARGV[4] key hash (hex)  ARGV[5] key id  ARGV[6] name
--         ARGV[7] created (ms)  ARGV[8] expires (ms, 0 = never)
-- revoke: ARGV[3] key id
-- touch:  ARGV[3..] pairs of key hash (hex), last used (ms)
-- Keys: k:<hash> hash {id, user, name, created_ms, expires_ms, last_used_ms};
--       kid:<key id> the key's hash; u:<user>:keys set of the user's key ids.
-- Returns 'ok' (touch: the number of keys touched), or 'no_user' / 'exists' / 'missing' with
-- nothing written.
-- Invariant: a key record exists exactly when its id maps to it and its user lists the id;
-- touch never recreates a revoked key; every add and revoke is in the changes stream.
local p, op = ARGV[1], ARGV[2]

if op == 'add' then
  local user, digest, kid = ARGV[3], ARGV[4], ARGV[5]
  if redis.call('EXISTS', p .. 'u:' .. user) == 0 then return 'no_user' end
  if redis.call('EXISTS', p .. 'k:' .. digest) == 1 or redis.call('EXISTS', p .. 'kid:' .. kid) == 1 then
    return 'exists'
  end
  redis.call('HSET', p .. 'k:' .. digest, 'id', kid, 'user', user, 'name', ARGV[6],
    'created_ms', int_arg(7, 0, 'created'), 'expires_ms', int_arg(8, 0, 'expires'), 'last_used_ms', 0)
  redis.call('SET', p .. 'kid:' .. kid, digest)
  redis.call('SADD', p .. 'u:' .. user .. ':keys', kid)
  account_changed(p, 'key', digest)
  return 'ok'
end

if op == 'revoke' then
  local kid = ARGV[3]
  local digest = redis.call('GET', p .. 'kid:' .. kid)
  if not digest then return 'missing' end
  local user = redis.call('HGET', p .. 'k:' .. digest, 'user')
  redis.call('DEL', p .. 'k:' .. digest, p .. 'kid:' .. kid)
  if user then redis.call('SREM', p .. 'u:' .. user .. ':keys', kid) end
  account_changed(p, 'key', digest)
  return 'ok'
end

need(op == 'touch', 'op is add, revoke or touch')
local touched = 0
for i = 3, #ARGV, 2 do
  local key = p .. 'k:' .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'last_used_ms', int_arg(i + 1, 0, 'last used'))
    touched = touched + 1
  end
end
return touched
