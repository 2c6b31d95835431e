"""The admin API: accounts (users, keys, teams), usage, tier totals and the ledger export."""
