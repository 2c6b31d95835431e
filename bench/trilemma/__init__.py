"""`python -m bench.trilemma`: granularity, real-time cost and optimality of metering per lease size."""
