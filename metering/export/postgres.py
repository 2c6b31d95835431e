"""The PostgreSQL sink: each batch upserted in one transaction into `usage_events` (schema and
the `usage_daily` view in `postgres.sql`), keyed by the request id, and its threshold
notifications into `threshold_notifications`, keyed by their id, so writing a batch again changes
nothing."""

import datetime
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from metering.ledger import LedgerEntry

SCHEMA = (Path(__file__).parent / "postgres.sql").read_text()
_SCHEMA_LOCK = 0x63617067  # an advisory lock: exporters starting together create the schema once
_COLUMNS = (
    "request_id, user_id, team_id, tier, model, prompt_tokens, cached_tokens, completion_tokens, "
    "value_nano, finish_reason, ttft_ms, duration_ms, settled_at, ledger_ms, ledger_seq"
)
_UPSERT = f"""
INSERT INTO usage_events ({_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (request_id) DO UPDATE SET
    ({_COLUMNS}) = ROW(EXCLUDED.*)
WHERE (usage_events.ledger_ms, usage_events.ledger_seq) < (EXCLUDED.ledger_ms, EXCLUDED.ledger_seq)
"""


def row_of(entry: LedgerEntry) -> tuple:
    """The `usage_events` row of one ledger entry."""
    r = entry.record()
    ms, seq = entry.order
    settled = datetime.datetime.fromtimestamp(int(r["ts_ms"]) / 1000, datetime.UTC)  # type: ignore[call-overload]
    return (
        r["request_id"], r["user"], r["team"], r["tier"], r["model"], r["prompt_tokens"],
        r["cached_tokens"], r["completion_tokens"], r["value_nano"], r["finish_reason"],
        r["ttft_ms"], r["duration_ms"], settled, ms, seq,
    )  # fmt: skip


_NOTICE = """
INSERT INTO threshold_notifications (id, user_id, team_id, scope, window_name, unit, share, cap, used,
    period, request_id, notified_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (id) DO NOTHING
"""


def notice_row(entry: LedgerEntry) -> tuple:
    """The `threshold_notifications` row of one notification."""
    r = entry.record()
    at = datetime.datetime.fromtimestamp(int(r["ts_ms"]) / 1000, datetime.UTC)  # type: ignore[call-overload]
    return (
        r["id"], r["user"], r["team"], r["scope"], r["window"], r["unit"], r["share"], r["cap"],
        r["used"], r["period"], r["request_id"], at,
    )  # fmt: skip


class PostgresSink:
    """Writes to the database at `dsn`, creating the table and view when missing."""

    recent: frozenset[str] = frozenset()

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=10)
        return self._conn

    async def start(self) -> None:
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    async def write(self, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        conn = await self._connection()
        try:
            async with conn.transaction():
                usage = [row_of(entry) for entry in entries if not entry.is_notice]
                notices = [notice_row(entry) for entry in entries if entry.is_notice]
                if usage:
                    await conn.executemany(_UPSERT, usage)
                if notices:
                    await conn.executemany(_NOTICE, notices)
        except (OSError, asyncpg.PostgresConnectionError):
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=5)
