"""`python -m bench.soak`: a bounded soak with faults, then an audit."""
