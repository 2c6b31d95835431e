"""`python -m bench.ledger`: the ledger exporter under load, and what the ledger costs Redis."""
