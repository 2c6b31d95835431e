"""The `capgate exporter` service: the ledger exporter (`metering.export`) with the sink the
settings name, its Prometheus metrics, and a clean stop on SIGTERM or SIGINT."""

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge, start_http_server

from metering.export.exporter import Exporter, PassResult, Shard, age_s
from metering.export.http import HttpSink
from metering.export.jsonl import JsonlSink
from metering.export.postgres import PostgresSink
from metering.export.sink import Sink
from proxy.app import redis_client
from proxy.settings import (
    ExporterSettings,
    JsonlSinkSettings,
    PostgresSinkSettings,
    Settings,
    WebhookSettings,
)

log = logging.getLogger("capgate.export")
EXPORTED = Counter(
    "capgate_ledger_exported_total", "Ledger events written to the sink and trimmed from Redis"
)
SKIPPED = Counter(
    "capgate_ledger_export_skipped_total",
    "Ledger events trimmed without writing: the sink held them already (its last batch, after a crash)",
)
ERRORS = Counter("capgate_ledger_export_errors_total", "Export passes that failed (retried)")
BACKLOG = Gauge("capgate_ledger_backlog_events", "Ledger events in Redis waiting for export, this shard")
OLDEST = Gauge("capgate_ledger_backlog_oldest_seconds", "Age of the oldest ledger event waiting, this shard")
NOTICES = Counter("capgate_notifications_sent_total", "Threshold notifications taken by the receiver")
MAX_BACKLOG = Gauge("capgate_ledger_backlog_max_events", "exporter.max_backlog: the backlog alert's bound")


def build_sink(settings: ExporterSettings, instance: str) -> Sink:
    """The sink `settings.sink` describes."""
    sink = settings.sink
    if isinstance(sink, PostgresSinkSettings):
        return PostgresSink(sink.dsn)
    if isinstance(sink, JsonlSinkSettings):
        return JsonlSink(Path(sink.dir), instance, sink.rotate_bytes, sink.rotate_hourly)
    return webhook_sink(sink, instance)


def webhook_sink(webhook: WebhookSettings, instance: str) -> HttpSink:
    """The HTTP sink POSTing to `webhook`, journaling as `instance`."""
    return HttpSink(
        webhook.url,
        webhook.secret.encode(),
        source=webhook.source,
        timeout_s=webhook.timeout_s,
        max_backoff_s=webhook.max_backoff_s,
        state_dir=Path(webhook.state_dir) if webhook.state_dir else None,
        instance=instance,
    )


def _observe_notices(result: PassResult) -> None:
    NOTICES.inc(result.exported)


def _observe(result: PassResult) -> None:
    EXPORTED.inc(result.exported)
    SKIPPED.inc(result.skipped)
    BACKLOG.set(result.backlog)
    OLDEST.set(age_s(result.oldest_ms))


async def run_exporter(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT: the ledger's exporter and, with `exporter.notify`, the
    notifications'. The instance name is the shard's, so that a restarted exporter finds its own
    journal (one process per shard: the lock in Redis keeps it so)."""
    ex = settings.exporter
    instance = f"{ex.shard}-of-{ex.shards}"
    redis = redis_client(settings)
    shard = Shard(ex.shard, ex.shards)
    ledger = Exporter(redis, build_sink(ex, instance), shard, batch=ex.batch, lock_ttl_s=ex.lock_ttl_s)
    exporters: list[tuple[Exporter, Callable[[PassResult], None]]] = [(ledger, _observe)]
    if ex.notify is not None:
        sink = webhook_sink(ex.notify, f"notices-{instance}")
        notices = Exporter(redis, sink, shard, batch=ex.batch, lock_ttl_s=ex.lock_ttl_s, notices=True)
        exporters.append((notices, _observe_notices))
    MAX_BACKLOG.set(ex.max_backlog)
    if ex.metrics_port:
        start_http_server(ex.metrics_port, addr=ex.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("exporting the ledger of shard %s/%s to %s", ex.shard, ex.shards, ex.sink.kind)
    try:
        await asyncio.gather(
            *(
                exporter.run(stop, ex.interval_s, observe, lambda _: ERRORS.inc())
                for exporter, observe in exporters
            )
        )
    finally:
        await redis.aclose()
