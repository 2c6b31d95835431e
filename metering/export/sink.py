"""What the exporter needs of a sink."""

from collections.abc import Sequence
from typing import Protocol

from metering.ledger import LedgerEntry


class Sink(Protocol):
    """A durable destination for ledger entries.

    `write` returns only once the entries are durable there, and writing an entry again (after a
    crash before its acknowledgement in Redis) leaves one copy: the sink is idempotent on the
    request id, or remembers the keys of the last batch it took (`recent`, the `LedgerEntry.key`s)
    so that a restarted exporter acknowledges them before writing anything.
    """

    recent: frozenset[str]

    async def start(self) -> None: ...

    async def write(self, entries: Sequence[LedgerEntry]) -> None: ...

    async def close(self) -> None: ...
