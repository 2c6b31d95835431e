"""The capgate benchmark: the same workloads straight to the upstream, through capgate with full
metering, and through the LiteLLM proxy, interleaved on one machine. Run `python -m bench`."""
