"""Test harness: real Redis, Redis Cluster and vLLM servers run as managed child processes."""

from .processes import ManagedProcess, ProcessExitedError, free_port, port_is_free, stop_all_on_sigterm
from .prom import Samples, parse, sample_sum
from .redis_server import RedisCluster, RedisServer
from .vllm_server import VllmServer

__all__ = [
    "ManagedProcess",
    "ProcessExitedError",
    "RedisCluster",
    "RedisServer",
    "Samples",
    "VllmServer",
    "free_port",
    "parse",
    "port_is_free",
    "sample_sum",
    "stop_all_on_sigterm",
]
