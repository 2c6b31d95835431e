-- account_user: create, change or delete a user account (lib.lua: account keys and changes).
--
-- KEYS[1] the account changes stream (routes the call to the accounts' hash slot)
-- ARGV[1] key prefix   ARGV[2] op: create | move | update | delete   ARGV[3] user id
-- ARGV[4] tier ('' = the policy's default)   ARGV[5] team ('' = none)   ARGV[6] now (ms)
-- ARGV[7] '1' when the team is one of the policy file's (not stored here)
-- ARGV[8] update: '1' to set the tier   ARGV[9] update: '1' to set the team
-- ARGV[10] move, update: the team the caller read (the change is refused if it is no longer so)
-- move: take the user's team change (to ARGV[5]) for this caller: refused ('busy') while another
-- change of their team started less than MOVE_HOLD_MS ago (one cut short is taken over after
-- that); its counters then move (meter.py), and an update setting the team ends it.
-- Keys: u:<id> hash {tier, team, created_ms, moving_to, moving_since}; users zset of ids;
--       u:<id>:keys set of key ids; t:<team>:members set of user ids; k:<hash>, kid:<key id>
--       (see account_key.lua).
-- Returns 'ok', or 'exists' / 'missing' / 'no_team' / 'conflict' / 'busy' with nothing written.
-- Invariant: a user is in its team's member set exactly when its record names the team; a
-- deleted user has no key left; two changes of one user's team never run at once; every change
-- is in the changes stream.
local MOVE_HOLD_MS = 30000
local p, op, id = ARGV[1], ARGV[2], ARGV[3]
local user = p .. 'u:' .. id
local function team_ok(team)
  return team == '' or ARGV[7] == '1' or redis.call('EXISTS', p .. 't:' .. team) == 1
end
local function members(team) return p .. 't:' .. team .. ':members' end

if op == 'create' then
  if redis.call('EXISTS', user) == 1 then return 'exists' end
  local tier, team = ARGV[4], ARGV[5]
  if not team_ok(team) then return 'no_team' end
  redis.call('HSET', user, 'tier', tier, 'team', team, 'created_ms', int_arg(6, 0, 'now'))
  redis.call('ZADD', p .. 'users', 0, id)
  if team ~= '' then redis.call('SADD', members(team), id) end
  account_changed(p, 'user', id)
  return 'ok'
end

if redis.call('EXISTS', user) == 0 then return 'missing' end
local current = redis.call('HGET', user, 'team') or ''

if op == 'move' then
  if current ~= ARGV[10] then return 'conflict' end
  local now = int_arg(6, 0, 'now')
  local to = redis.call('HGET', user, 'moving_to')
  local since = tonumber(redis.call('HGET', user, 'moving_since'))
  if to and since and now - since < MOVE_HOLD_MS then return 'busy' end
  if not team_ok(ARGV[5]) then return 'no_team' end
  redis.call('HSET', user, 'moving_to', ARGV[5], 'moving_since', now)
  return 'ok'
end

if op == 'update' then
  if ARGV[9] == '1' then
    if current ~= ARGV[10] then return 'conflict' end
    redis.call('HDEL', user, 'moving_to', 'moving_since')
    local team = ARGV[5]
    if not team_ok(team) then return 'no_team' end
    if current ~= '' then redis.call('SREM', members(current), id) end
    if team ~= '' then redis.call('SADD', members(team), id) end
    redis.call('HSET', user, 'team', team)
  end
  if ARGV[8] == '1' then redis.call('HSET', user, 'tier', ARGV[4]) end
  account_changed(p, 'user', id)
  return 'ok'
end

need(op == 'delete', 'op is create, move, update or delete')
if current ~= '' then redis.call('SREM', members(current), id) end
for _, kid in ipairs(redis.call('SMEMBERS', user .. ':keys')) do
  local digest = redis.call('GET', p .. 'kid:' .. kid)
  redis.call('DEL', p .. 'kid:' .. kid)
  if digest then
    redis.call('DEL', p .. 'k:' .. digest)
    account_changed(p, 'key', digest)
  end
end
redis.call('DEL', user, user .. ':keys')
redis.call('ZREM', p .. 'users', id)
account_changed(p, 'user', id)
return 'ok'
