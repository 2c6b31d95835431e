"""Gateway settings: a YAML file (path in `CAPGATE_CONFIG` or `--config`) overlaid by environment
variables, validated at start with errors that name the bad field.

Environment variables are `CAPGATE_<FIELD>` for top-level fields and `CAPGATE_<SECTION>__<FIELD>`
for nested ones, e.g. `CAPGATE_REDIS_URL`, `CAPGATE_TIMEOUTS__READ_S`. `CAPGATE_UPSTREAMS` takes a
comma-separated list of base URLs. `CAPGATE_*` variables that name no setting (the set-up scripts'
`CAPGATE_VLLM_VENV`, say) are not settings and are left alone.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.loader import ConfigError, Problem, parse_yaml, validate

ENV_PREFIX = "CAPGATE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Upstream(_Section):
    """One vLLM OpenAI-compatible server."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    name: str | None = None
    # The most requests this vLLM runs at once (its `--max-num-seqs`). Unset: learned from its
    # /metrics, as the most it ran while others waited (vLLM publishes its setting only in dev mode).
    slots: Annotated[int, Field(gt=0)] | None = None

    @property
    def label(self) -> str:
        return self.name or self.url


class Timeouts(_Section):
    """Seconds. `read_s` bounds the wait for the upstream's answer and then for each chunk of it, not
    the whole stream (a request is written in one call, so a stalled upstream is caught by it too)."""

    connect_s: Annotated[float, Field(gt=0)] = 5.0
    read_s: Annotated[float, Field(gt=0)] = 600.0
    redis_s: Annotated[float, Field(gt=0)] = 0.5


class Admission(_Section):
    """Capacity-aware admission: slots counted across replicas in Redis, headroom kept for tiers
    with a `ttft_objective_s` and adapted to it, vLLM's own `/metrics` as a second signal."""

    enabled: bool = True
    interval_s: Annotated[float, Field(gt=0)] = 0.5
    stale_after_s: Annotated[float, Field(gt=0)] = 3.0
    max_waiting: Annotated[int, Field(ge=0)] = 4
    max_kv_cache_usage: Annotated[float, Field(gt=0, le=1)] = 0.95
    queue_timeout_s: Annotated[float, Field(ge=0)] = 2.0
    retry_after_s: Annotated[int, Field(gt=0)] = 2
    # Slots of every upstream that tiers below a protected one never take.
    headroom: Annotated[int, Field(ge=0)] = 1
    # Adapting to the protected tiers' time to first token: the share of capacity lower tiers may
    # fill is multiplied by `backoff` after an interval that missed (never below `min_share`), and
    # grows by `step` after one that met it.
    adapt_interval_s: Annotated[float, Field(gt=0)] = 5.0
    min_share: Annotated[float, Field(ge=0, le=1)] = 0.25
    backoff: Annotated[float, Field(gt=0, lt=1)] = 0.5
    step: Annotated[float, Field(gt=0, le=1)] = 0.1
    # A protected request with no slot after this fraction of its objective ends the stream of
    # the lowest `preemptible` tier on its upstream.
    preempt_after: Annotated[float, Field(gt=0, le=1)] = 0.25
    # Held requests are retried this often (and at once when this process frees a slot).
    release_interval_s: Annotated[float, Field(gt=0)] = 0.05
    # A slot not refreshed for this long is dropped (its replica died); refreshed every third.
    slot_ttl_s: Annotated[float, Field(gt=0)] = 10.0
    # Slot takes failing (Redis unreachable or too slow) for this long before this process counts
    # slots alone; until then held tiers wait, so a stall of Redis cannot overfill an upstream.
    local_count_after_s: Annotated[float, Field(ge=0)] = 1.0


class Accounts(_Section):
    """Accounts created through the admin API, kept in Redis and cached by each process."""

    # Records cached per kind (keys, users, teams); unknown ones are cached apart, a tenth of it.
    cache_size: Annotated[int, Field(gt=0)] = 100_000
    # How often each process reads the accounts' changes: a revoked key is refused within this.
    sync_interval_s: Annotated[float, Field(gt=0, le=1)] = 0.25
    # How often the time each key was last used is written to Redis.
    last_used_interval_s: Annotated[float, Field(gt=0)] = 10.0


class PostgresSink(_Section):
    """Rows in PostgreSQL's `usage_events` (created when missing), one per request."""

    kind: Literal["postgres"]
    dsn: str = "postgresql://capgate@127.0.0.1:5432/capgate"


class JsonlSink(_Section):
    """JSON Lines files in `dir`, one per instance at a time, rotated by size and by the hour."""

    kind: Literal["jsonl"]
    dir: str = ".run/ledger"
    rotate_bytes: Annotated[int, Field(gt=0)] = 64 << 20
    rotate_hourly: bool = True


class Webhook(_Section):
    """An HTTP receiver of batched CloudEvents, signed with `secret` (HMAC-SHA256), retried with
    backoff until taken: the HTTP sink of the ledger, and `exporter.notify`."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    secret: Annotated[str, Field(min_length=16)]
    source: str = "capgate"
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_backoff_s: Annotated[float, Field(gt=0)] = 30.0
    # Where the last batch delivered is journaled, so that a crash does not send it again.
    state_dir: str | None = ".run/export"


class HttpSink(Webhook):
    """The ledger POSTed to a webhook."""

    kind: Literal["http"]


class Exporter(_Section):
    """`capgate exporter`: the ledger moved from Redis into a sink exactly once, then trimmed."""

    sink: Annotated[PostgresSink | JsonlSink | HttpSink, Field(discriminator="kind")] = JsonlSink(
        kind="jsonl"
    )
    # Where threshold notifications (a tier's `caps.notify_at`) are POSTed.
    notify: Webhook | None = None
    # Several instances split the users' streams: each runs with its own `shard` of `shards`.
    shard: Annotated[int, Field(ge=0)] = 0
    shards: Annotated[int, Field(gt=0)] = 1
    batch: Annotated[int, Field(gt=0, le=10_000)] = 500
    interval_s: Annotated[float, Field(gt=0)] = 1.0
    lock_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    # Events waiting in Redis above which `CapgateLedgerBacklog` fires (the exporter's gauge).
    max_backlog: Annotated[int, Field(gt=0)] = 100_000
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108

    @model_validator(mode="after")
    def _shard_in_range(self) -> "Exporter":
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} is not below shards ({self.shards})")
        return self


class Settings(_Section):
    """Everything the gateway process needs to start."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1)] = 1
    upstreams: Annotated[list[Upstream], Field(min_length=1)] = [Upstream(url="http://127.0.0.1:8001")]
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    # Connections to Redis (per cluster node); a request holds one at a time, so this bounds the
    # requests metered at once. When all are busy a call waits for one, within `timeouts.redis_s`.
    redis_max_connections: Annotated[int, Field(gt=0)] = 512
    # Script calls waiting on the pipelined connection at once; one more fails at once (the tier's
    # fail mode applies) rather than queue behind a stalled Redis.
    redis_max_in_flight: Annotated[int, Field(gt=0)] = 4096
    policy_file: str = "deploy/policies/example.yaml"
    policy_poll_s: Annotated[float, Field(gt=0)] = 1.0
    max_body_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    prompt_bound: Literal["bytes", "tokenize"] = "bytes"
    lease_ttl_s: Annotated[float, Field(gt=0)] = 120.0
    reap_interval_s: Annotated[float, Field(gt=0)] = 5.0
    spool_dir: str = ".run/spool"
    spool_max_bytes: Annotated[int, Field(gt=0)] = 64 << 20
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    timeouts: Timeouts = Timeouts()
    admission: Admission = Admission()
    accounts: Accounts = Accounts()
    exporter: Exporter = Exporter()


def _env_overlay(env: Mapping[str, str]) -> dict[str, Any]:
    overlay: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Settings.model_fields:
            continue
        value: Any = raw
        if path == ["upstreams"]:
            value = [{"url": url.strip()} for url in raw.split(",") if url.strip()]
        else:
            value = yaml.safe_load(raw) if raw else raw
        node = overlay
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return overlay


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `path` (or `$CAPGATE_CONFIG`, or defaults) overlaid by the environment."""
    env = os.environ if env is None else env
    path = path or env.get(f"{ENV_PREFIX}CONFIG")
    source = path or "<environment>"
    data: object = {}
    lines: dict = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(source, [Problem("", None, f"cannot read settings: {exc}")]) from exc
        data, lines = parse_yaml(text, source)
    data = {} if data is None else data
    if not isinstance(data, dict):
        return validate(data, Settings, source, lines)
    return validate(_merge(data, _env_overlay(env)), Settings, source, lines)
