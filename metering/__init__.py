"""Metering: real-time token accounting in Redis (reserve, extend, settle, reap) and its ledger."""
