"""Policies: the operator's offer (tiers, users, keys) as typed configuration, and pure logic on it."""
