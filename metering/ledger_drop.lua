-- ledger_drop: delete a user's ledger (or notices) stream that the exporter emptied.
--
-- KEYS[1] stream   the user's ledger or notices stream
-- Returns 1 when the stream was empty and is deleted, else 0 (an event came since: it stays).
-- Invariant: no event is ever deleted here; an empty stream is deleted so that the exporter's scan
-- finds only users with events waiting.
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
