"""`python -m bench.added`: the latency capgate adds to the real vLLM, request by request."""
