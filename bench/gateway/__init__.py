"""`python -m bench.gateway`: the same workloads straight to the upstream, through an nginx hop,
through capgate with full metering and through the LiteLLM proxy, interleaved on one machine."""
