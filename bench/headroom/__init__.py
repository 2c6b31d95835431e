"""`python -m bench.headroom`: the real-time vs optimality trade-off of admission headroom."""
