"""Gateway settings: a YAML file (path in `CAPGATE_CONFIG` or `--config`) overlaid by environment
variables, validated at start with errors that name the bad field.

Environment variables are `CAPGATE_<FIELD>` for top-level fields and `CAPGATE_<SECTION>__<FIELD>`
for nested ones, e.g. `CAPGATE_REDIS_URL`, `CAPGATE_TIMEOUTS__READ_S`. `CAPGATE_UPSTREAMS` takes a
comma-separated list of base URLs. `CAPGATE_*` variables that name no setting (the set-up scripts'
`CAPGATE_VLLM_VENV`, say) are not settings and are left alone.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.loader import ConfigError, Problem, parse_yaml, validate

ENV_PREFIX = "CAPGATE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class UpstreamSettings(_Section):
    """One vLLM OpenAI-compatible server."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    """The server's base URL, e.g. `http://vllm-0.vllm:8000`."""
    name: str | None = None
    """The upstream's label in metrics and logs (its URL when unset)."""
    slots: Annotated[int, Field(gt=0)] | None = None
    """The most requests this vLLM runs at once (its `--max-num-seqs`). Unset: learned from its
    /metrics, as the most it ran while others waited (vLLM publishes its setting only in dev mode)."""

    @property
    def label(self) -> str:
        return self.name or self.url


class TimeoutSettings(_Section):
    """Seconds. `read_s` bounds the wait for the upstream's answer and then for each chunk of it, not
    the whole stream (a request is written in one call, so a stalled upstream is caught by it too)."""

    connect_s: Annotated[float, Field(gt=0)] = 5.0
    """Connecting to an upstream."""
    read_s: Annotated[float, Field(gt=0)] = 600.0
    """The wait for the upstream's answer, and then for each chunk of it (504 when exceeded)."""
    redis_s: Annotated[float, Field(gt=0)] = 0.5
    """One Redis call; a slower one counts as Redis failing, and the tier's `fail_mode` applies."""


class AdmissionSettings(_Section):
    """Capacity-aware admission: slots counted across replicas in Redis, headroom kept for tiers
    with a `ttft_objective_s` and adapted to it, vLLM's own `/metrics` as a second signal."""

    enabled: bool = True
    """Off: every request goes to the least loaded upstream at once, no slot is counted."""
    interval_s: Annotated[float, Field(gt=0)] = 0.5
    """How often each upstream's `/v1/models` and `/metrics` are polled."""
    stale_after_s: Annotated[float, Field(gt=0)] = 3.0
    """vLLM metrics older than this count as unknown, never as idle (admission is then degraded)."""
    max_waiting: Annotated[int, Field(ge=0)] = 4
    """An upstream with this many requests waiting in vLLM takes no request of a held tier."""
    max_kv_cache_usage: Annotated[float, Field(gt=0, le=1)] = 0.95
    """An upstream whose KV cache use is over this takes no request of a held tier."""
    queue_timeout_s: Annotated[float, Field(ge=0)] = 2.0
    """A request still waiting for room after this is shed with 429 `server_overloaded`."""
    retry_after_s: Annotated[int, Field(gt=0)] = 2
    """The `Retry-After` of a shed request, in seconds."""
    headroom: Annotated[int, Field(ge=0)] = 1
    """Slots of every upstream that tiers below a protected one never take."""
    adapt_interval_s: Annotated[float, Field(gt=0)] = 5.0
    """Adapting to the protected tiers' time to first token: the share of capacity lower tiers may
    fill is multiplied by `backoff` after an interval of this length that missed (never below
    `min_share`), and grows by `step` after one that met it."""
    min_share: Annotated[float, Field(ge=0, le=1)] = 0.25
    """The least share of capacity the tiers below a protected one keep."""
    backoff: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """The factor the share is multiplied by after an interval in which a protected tier missed."""
    step: Annotated[float, Field(gt=0, le=1)] = 0.1
    """What the share grows by after an interval in which the protected tiers met their objective."""
    preempt_after: Annotated[float, Field(gt=0, le=1)] = 0.25
    """A protected request with no slot after this fraction of its objective ends the stream of
    the lowest `preemptible` tier on its upstream."""
    release_interval_s: Annotated[float, Field(gt=0)] = 0.05
    """Held requests are retried this often (and at once when this process frees a slot)."""
    slot_ttl_s: Annotated[float, Field(gt=0)] = 10.0
    """A slot not refreshed for this long is dropped (its replica died); refreshed every third."""
    local_count_after_s: Annotated[float, Field(ge=0)] = 1.0
    """Slot takes failing (Redis unreachable or too slow) for this long before this process counts
    slots alone; until then held tiers wait, so a stall of Redis cannot overfill an upstream."""


class AccountSettings(_Section):
    """Accounts created through the admin API, kept in Redis and cached by each process."""

    cache_size: Annotated[int, Field(gt=0)] = 100_000
    """Records cached per kind (keys, users, teams); unknown ones are cached apart, a tenth of it."""
    sync_interval_s: Annotated[float, Field(gt=0, le=1)] = 0.25
    """How often each process reads the accounts' changes: a revoked key is refused within this."""
    last_used_interval_s: Annotated[float, Field(gt=0)] = 10.0
    """How often the time each key was last used is written to Redis."""


class PostgresSinkSettings(_Section):
    """Rows in PostgreSQL's `usage_events` (created when missing), one per request."""

    kind: Literal["postgres"]
    """Selects this sink."""
    dsn: str = "postgresql://capgate@127.0.0.1:5432/capgate"
    """The PostgreSQL connection string."""


class JsonlSinkSettings(_Section):
    """JSON Lines files in `dir`, one per instance at a time, rotated by size and by the hour."""

    kind: Literal["jsonl"]
    """Selects this sink."""
    dir: str = ".run/ledger"
    """The directory the files are written to."""
    rotate_bytes: Annotated[int, Field(gt=0)] = 64 << 20
    """A file is closed and a new one started past this size (64 MiB), between batches."""
    rotate_hourly: bool = True
    """Also start a new file every hour."""


class WebhookSettings(_Section):
    """An HTTP receiver of batched CloudEvents, signed with `secret` (HMAC-SHA256), retried with
    backoff until taken: the HTTP sink of the ledger, and `exporter.notify`."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    """Where batches are POSTed."""
    secret: Annotated[str, Field(min_length=16)]
    """The HMAC-SHA256 key of the `Capgate-Signature` header."""
    source: str = "capgate"
    """The CloudEvents `source` of each event."""
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """One POST's timeout."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 30.0
    """The longest wait between retries (from 0.5 s, doubling), until the receiver takes the batch."""
    state_dir: str | None = ".run/export"
    """Where the last batch delivered is journaled, so that a crash does not send it again."""


class HttpSinkSettings(WebhookSettings):
    """The ledger POSTed to a webhook."""

    kind: Literal["http"]
    """Selects this sink."""


class ExporterSettings(_Section):
    """`capgate exporter`: the ledger moved from Redis into a sink exactly once, then trimmed."""

    sink: Annotated[
        PostgresSinkSettings | JsonlSinkSettings | HttpSinkSettings, Field(discriminator="kind")
    ] = JsonlSinkSettings(kind="jsonl")
    """Where the ledger goes, picked by `kind`: `postgres`, `jsonl` or `http`."""
    notify: WebhookSettings | None = None
    """Where threshold notifications (a tier's `caps.notify_at`) are POSTed."""
    shard: Annotated[int, Field(ge=0)] = 0
    """Several instances split the users' streams: each runs with its own `shard` of `shards`."""
    shards: Annotated[int, Field(gt=0)] = 1
    """How many shards the users' streams are split into."""
    batch: Annotated[int, Field(gt=0, le=10_000)] = 500
    """Events read per user's stream per page."""
    interval_s: Annotated[float, Field(gt=0)] = 1.0
    """The pause between passes (none after a full page)."""
    lock_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    """How long a shard's lock in Redis lasts unless its holder refreshes it (before each trim)."""
    max_backlog: Annotated[int, Field(gt=0)] = 100_000
    """Events waiting in Redis above which `CapgateLedgerBacklog` fires (the exporter's gauge)."""
    metrics_host: str = "127.0.0.1"
    """The address of the exporter's Prometheus endpoint."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    """The port of the exporter's Prometheus endpoint."""

    @model_validator(mode="after")
    def _shard_in_range(self) -> "ExporterSettings":
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} is not below shards ({self.shards})")
        return self


class Settings(_Section):
    """Everything the gateway process needs to start."""

    host: str = "127.0.0.1"
    """The address the gateway listens on."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """The port the gateway listens on."""
    workers: Annotated[int, Field(ge=1)] = 1
    """uvicorn worker processes; their metrics are merged."""
    upstreams: Annotated[list[UpstreamSettings], Field(min_length=1)] = [
        UpstreamSettings(url="http://127.0.0.1:8001")
    ]
    """The vLLM servers, each on its own address (`CAPGATE_UPSTREAMS`: comma-separated URLs)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """`redis://`, `rediss://` (TLS) or `unix://`; on a cluster, any one node."""
    redis_cluster: bool = False
    """Talk to a Redis Cluster."""
    redis_max_connections: Annotated[int, Field(gt=0)] = 512
    """Connections to Redis (per cluster node); a request holds one at a time, so this bounds the
    requests metered at once. When all are busy a call waits for one, within `timeouts.redis_s`.
    redis-py's pool, for housekeeping, and for the scripts on a cluster or a `rediss://` URL."""
    redis_max_in_flight: Annotated[int, Field(gt=0)] = 4096
    """Script calls waiting on the pipelined connection at once; one more fails at once (the tier's
    fail mode applies) rather than queue behind a stalled Redis."""
    policy_file: str = "deploy/policies/example.yaml"
    """The policy file; reloaded when it changes and on `SIGHUP`."""
    policy_poll_s: Annotated[float, Field(gt=0)] = 1.0
    """How often the policy file is checked for changes."""
    max_body_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    """The largest request body (1 MiB); a larger one is refused with 413."""
    prompt_bound: Literal["bytes", "tokenize"] = "bytes"
    """How a prompt's tokens are bounded before it is sent: by its bytes (no round trip), or
    exactly by vLLM's `/tokenize` (one more round trip per request)."""
    lease_ttl_s: Annotated[float, Field(gt=0)] = 120.0
    """A reservation not refreshed for this long is reaped; its process refreshes it every third."""
    reap_interval_s: Annotated[float, Field(gt=0)] = 5.0
    """How often each process reaps expired reservations."""
    spool_dir: str = ".run/spool"
    """Where usage that cannot reach Redis is spooled (fsync'd) until it is replayed."""
    spool_max_bytes: Annotated[int, Field(gt=0)] = 64 << 20
    """The spool size (64 MiB) past which fail-open tiers answer 503; usage of requests already
    served is spooled past it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The log level."""
    timeouts: TimeoutSettings = TimeoutSettings()
    """Timeouts, in seconds."""
    admission: AdmissionSettings = AdmissionSettings()
    """Capacity-aware admission."""
    accounts: AccountSettings = AccountSettings()
    """Accounts kept in Redis and their cache."""
    exporter: ExporterSettings = ExporterSettings()
    """`capgate exporter`: the ledger moved into a sink."""


def env_variable(path: Sequence[str]) -> str:
    """The environment variable that sets the setting at `path`: (`timeouts`, `read_s`) is
    `CAPGATE_TIMEOUTS__READ_S`. `_env_overlay` reads the names back."""
    return ENV_PREFIX + "__".join(path).upper()


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
