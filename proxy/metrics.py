"""Prometheus metrics of the gateway: names by Prometheus conventions, labels kept bounded
(tier, model, outcome, window, token type, operation; never a user or a key).

With several uvicorn workers set `PROMETHEUS_MULTIPROC_DIR` (the CLI does): every process writes
its samples there and `/metrics` sums them, so nothing is lost or counted twice.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from proxy import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# `route`: the API a request came by (chat, completions, embeddings, messages, responses), a bounded set.
REQUESTS = Counter(
    "capgate_requests",
    "Requests finished, by tier, model, route and outcome.",
    ["tier", "model", "route", "outcome"],
)
TOKENS = Counter(
    "capgate_tokens", "Tokens metered, by tier, route and token type.", ["tier", "route", "type"]
)
VALUE = Counter("capgate_value", "Value of metered usage in the policy currency, by tier.", ["tier"])
CAP_REJECTIONS = Counter(
    "capgate_cap_rejections", "Requests refused for a token cap, by tier and window.", ["tier", "window"]
)
TTFT = Histogram(
    "capgate_time_to_first_token_seconds",
    "Time from request arrival to the first generated token, by tier and route.",
    ["tier", "route"],
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "capgate_inter_token_latency_seconds",
    "Mean time between generated tokens of a stream, by tier and route.",
    ["tier", "route"],
    buckets=TOKEN_GAP_BUCKETS,
)
DURATION = Histogram(
    "capgate_request_duration_seconds",
    "Time from request arrival to its end, by tier and route.",
    ["tier", "route"],
    buckets=DURATION_BUCKETS,
)
ADDED = Histogram(
    "capgate_added_latency_seconds",
    "Time capgate itself spends on a request before forwarding it (auth, policy, reservation).",
    buckets=OVERHEAD_BUCKETS,
)
OWN_TIME = Histogram(
    "capgate_own_time_seconds",
    "Time capgate itself spends on a forwarded request until its response begins: all but the wait "
    "for the upstream (the Server-Timing `capgate` entry).",
    buckets=OVERHEAD_BUCKETS,
)
RESERVATIONS = Gauge(
    "capgate_reservations_outstanding",
    "Requests holding a reservation in Redis.",
    multiprocess_mode="livesum",
)
LEASES = Counter("capgate_lease_extensions", "Lease extensions asked, by outcome.", ["outcome"])
REDIS_LATENCY = Histogram(
    "capgate_redis_call_seconds",
    "Latency of metering calls to Redis, by operation.",
    ["operation"],
    buckets=OVERHEAD_BUCKETS,
)
REDIS_ERRORS = Counter(
    "capgate_redis_errors", "Metering calls to Redis that failed, by operation.", ["operation"]
)
UPSTREAM_ERRORS = Counter("capgate_upstream_errors", "Failures reaching vLLM, by kind.", ["kind"])
ADMISSION_QUEUE = Gauge(
    "capgate_admission_queue_length",
    "Requests waiting for admission, by tier.",
    ["tier"],
    multiprocess_mode="livesum",
)
ADMISSION_SHED = Counter(
    "capgate_admission_shed", "Requests shed by load-aware admission, by tier.", ["tier"]
)
ADMISSION_DEGRADED = Gauge(
    "capgate_admission_degraded",
    "1 while vLLM's load is unknown: only the slot counts hold lower tiers back.",
    multiprocess_mode="max",
)
ADMISSION_SHARE = Gauge(
    "capgate_admission_share",
    "Share of each upstream's capacity the tiers below this protected tier may fill.",
    ["tier"],
    multiprocess_mode="min",
)
TTFT_OBJECTIVE_MISSED = Counter(
    "capgate_ttft_objective_missed",
    "Requests whose time to first token exceeded their tier's ttft_objective_s, by tier.",
    ["tier"],
)
TTFT_OBJECTIVE_UNATTAINABLE = Gauge(
    "capgate_ttft_objective_unattainable",
    "1 while a tier misses its ttft_objective_s with the tiers below it at their minimum share.",
    ["tier"],
    multiprocess_mode="max",
)
UPSTREAM_CAPACITY = Gauge(
    "capgate_upstream_capacity",
    "Requests an upstream runs at once, as admission knows it (NaN: unknown).",
    ["upstream"],
    multiprocess_mode="max",
)
PREEMPTIONS = Counter(
    "capgate_preemptions",
    "Streams ended early to free a slot for a protected tier, by the preempted stream's tier.",
    ["tier"],
)
POLICY_RELOADS = Counter("capgate_policy_reloads", "Policy reloads, by outcome.", ["outcome"])
SPOOL_BYTES = Gauge(
    "capgate_spool_bytes",
    "Usage events waiting in the local spool for Redis, in bytes.",
    multiprocess_mode="max",
)
PROMPT_BOUND_EXCEEDED = Counter(
    "capgate_prompt_bound_exceeded",
    "Settled requests whose real prompt tokens exceeded the reserved bound.",
)
BACKGROUND_ERRORS = Counter(
    "capgate_background_errors",
    "Steps of a background loop that raised (logged with a traceback; the loop goes on), by loop.",
    ["loop"],
)
BUILD = Gauge("capgate_build_info", "Always 1; the version of capgate.", ["version"], multiprocess_mode="max")
BUILD.labels(version=__version__).set(1)


def exposition() -> tuple[bytes, str]:
    """The metrics page: this process's registry, or all workers' when multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
