"""The HTTP sink: each batch POSTed as CloudEvents in batched mode
(`application/cloudevents-batch+json`), signed, and sent again with backoff until a 2xx.

A usage event's id is its request id (a late settlement that replaces a reaper's event: the request
id, `/`, its entry id), a threshold notification's its `id` (whose window, which, the threshold,
the period: `user:alice:month:tokens:800:24311`); `subject` is the user, `time` the settlement;
receivers deduplicate on the id, as the CloudEvents spec asks. The signature header
`Capgate-Signature: t=<unix s>,v1=<hex>` is the HMAC-SHA256, keyed by the shared secret, of
`<t>.<body>`: a receiver recomputes it and refuses an old `t` (a replay). The journal (when
`state_dir` is set) remembers the last batch a receiver acknowledged, so that a crash before the
exporter's acknowledgement in Redis sends it no event again.
"""

import asyncio
import datetime
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import orjson

from metering.export.journal import Journal, JournalState
from metering.ledger import LedgerEntry

log = logging.getLogger("capgate.export")
CONTENT_TYPE = "application/cloudevents-batch+json"
SIGNATURE_HEADER = "Capgate-Signature"
EVENT_TYPE = "dev.capgate.usage"
NOTICE_TYPE = "dev.capgate.threshold"


def cloud_event(entry: LedgerEntry, source: str) -> dict:
    """One ledger entry as a structured CloudEvent (spec 1.0)."""
    record = entry.record()
    if entry.is_notice:
        event_id, kind = str(record["id"]), NOTICE_TYPE
    else:
        event_id, kind = str(record["request_id"]), EVENT_TYPE
        if record.get("replaces"):
            event_id = f"{event_id}/{entry.entry_id}"
    ts = datetime.datetime.fromtimestamp(int(record["ts_ms"]) / 1000, datetime.UTC)  # type: ignore[call-overload]
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": kind,
        "subject": record["user"],
        "time": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": record,
    }


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Capgate-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """A receiver's check of a `Capgate-Signature` header (kept here so that tests and receivers
    written in Python agree with the sender)."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class HttpSink:
    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        source: str = "capgate",
        timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
        state_dir: Path | None = None,
        instance: str = "0",
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.secret = secret
        self.source = source
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.journal = Journal(state_dir / f".journal-http-{instance}.json") if state_dir else None
        self.recent: frozenset[str] = frozenset()
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        if self.journal is not None:
            self.recent = self.journal.read().keys

    async def write(self, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        assert self._client is not None, "start() first"
        body = orjson.dumps([cloud_event(entry, self.source) for entry in entries])
        backoff = 0.5
        while True:
            headers = {
                "content-type": CONTENT_TYPE,
                SIGNATURE_HEADER: signature(self.secret, int(time.time()), body),
            }
            try:
                reply = await self._client.post(self.url, content=body, headers=headers)
                if reply.is_success:
                    break
                log.warning("export receiver answered %s; retrying in %.1f s", reply.status_code, backoff)
            except httpx.HTTPError as exc:
                log.warning("export receiver unreachable (%r); retrying in %.1f s", exc, backoff)
            await self._sleep(backoff)  # type: ignore[misc]
            backoff = min(backoff * 2, self.max_backoff_s)
        keys = frozenset(entry.key for entry in entries)
        if self.journal is not None:
            self.journal.write(JournalState(keys))
        self.recent = keys

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
