"""`python -m bench.accounts`: what accounts in Redis cost, at a million keys."""
