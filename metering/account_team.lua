-- account_team: create, change or delete a team account (lib.lua: account keys and changes).
--
-- KEYS[1] the account changes stream (routes the call to the accounts' hash slot)
-- ARGV[1] key prefix   ARGV[2] op: create | update | delete   ARGV[3] team id
-- ARGV[4] tier ('' = none)   ARGV[5] windows as JSON ('' = none)   ARGV[6] now (ms)
-- Keys: t:<id> hash {tier, windows, created_ms}; teams zset of ids; t:<id>:members set.
-- Returns 'ok', or 'exists' / 'missing' / 'members' (a team with members is not deleted) with
-- nothing written.
-- Invariant: a deleted team has no members; every change is in the changes stream.
local p, op, id = ARGV[1], ARGV[2], ARGV[3]
local team = p .. 't:' .. id

if op == 'create' then
  if redis.call('EXISTS', team) == 1 then return 'exists' end
  redis.call('HSET', team, 'tier', ARGV[4], 'windows', ARGV[5], 'created_ms', int_arg(6, 0, 'now'))
  redis.call('ZADD', p .. 'teams', 0, id)
  account_changed(p, 'team', id)
  return 'ok'
end

if redis.call('EXISTS', team) == 0 then return 'missing' end

if op == 'update' then
  redis.call('HSET', team, 'tier', ARGV[4], 'windows', ARGV[5])
  account_changed(p, 'team', id)
  return 'ok'
end

need(op == 'delete', 'op is create, update or delete')
if redis.call('SCARD', team .. ':members') > 0 then return 'members' end
redis.call('DEL', team, team .. ':members')
redis.call('ZREM', p .. 'teams', id)
account_changed(p, 'team', id)
return 'ok'
