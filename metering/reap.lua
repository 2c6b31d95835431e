-- reap: return the reservations of one user whose lease expired (their proxy died or lost
-- Redis for longer than a lease), charging what was last observed.
--
-- KEYS[1] res   KEYS[2] live   KEYS[3] totals   KEYS[4] ledger   KEYS[5] settled  (as reserve.lua)
-- ARGV[1] now (ms)
-- Returns the number of reservations reaped.
-- Refuses (CAPGATE_ARG error) a `now` that is not a non-negative integer.
-- Invariant: a reaped request keeps a tombstone in `res` and its id in `settled`, so a late
-- settle adds only the usage after the last observation, never the whole request again.
return reap_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], int_arg(1, 0, 'now'))
