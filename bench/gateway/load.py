"""The load generator, run as its own process: `python -m bench.gateway.load SPEC_JSON`.

It opens `concurrency` keep-alive connections, warms each up (with `warmup_body` if given, a
cheap request that opens the connection and the gateway's paths), prints `READY` and waits for a line
on standard input (so the caller can read CPU counters at the start of the timed phase), then
sends requests back to back on every connection until `duration_s` has passed or `requests`
were sent, and prints one JSON line with every latency it saw. Request `i` uses key
`keys[i % len(keys)]`. For streams it times server-sent events as they arrive: time to the first
event, and the mean gap between tokens: from the first to the last event without usage, over the
completion tokens of the usage chunk less one (the client asks usage at the end only).
"""

import asyncio
import itertools
import json
import sys
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import uvloop

from bench.common.client import Connection, build_request

_DONE = b"data: [DONE]"


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how hard, for how long."""

    host: str
    port: int
    path: str
    body: str
    keys: list[str]
    stream: bool
    concurrency: int
    duration_s: float | None = None
    requests: int | None = None
    warmup: int = 1
    warmup_body: str | None = None


@dataclass
class LoadResult:
    """Everything one load run saw; times in microseconds."""

    sent: int = 0
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    latency_us: list[float] = field(default_factory=list)
    ttft_us: list[float] = field(default_factory=list)
    itl_us: list[float] = field(default_factory=list)
    tokens: int = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


class StreamTimes:
    """Server-sent events of one streamed response, timed as they arrive."""

    __slots__ = ("buffer", "error", "first", "last", "tokens")

    def __init__(self) -> None:
        self.buffer = b""
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.error: str | None = None

    def feed(self, data: bytes, at: float) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n\n")) >= 0:
            event, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if not event.startswith(b"data:") or event == _DONE:
                continue
            payload = event[5:].lstrip()
            if payload.startswith(b'{"error"'):
                self.error = payload[:200].decode(errors="replace")
            elif b'"usage":{' in payload:
                self.tokens = int(json.loads(payload)["usage"]["completion_tokens"])
            else:
                if self.first is None:
                    self.first = at
                self.last = at


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _one(connection: Connection, raw: bytes, stream: bool, result: LoadResult | None) -> None:
    """Send one request; record it in `result` (None: warm-up, record nothing)."""
    times = StreamTimes() if stream else None
    began = perf_counter()
    try:
        reply = await connection.request(raw, times.feed if times is not None else None)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        if result is not None:
            result.error(f"{type(exc).__name__}: {exc}")
        return
    done = perf_counter()
    if result is None:
        return
    if reply.status != 200:
        result.error(f"HTTP {reply.status}")
        return
    if times is not None:
        if times.error is not None or times.first is None or times.last is None:
            result.error(times.error or "stream without events")
            return
        result.ttft_us.append((times.first - began) * 1e6)
        if times.tokens > 1:
            result.itl_us.append((times.last - times.first) / (times.tokens - 1) * 1e6)
        result.tokens += times.tokens
    result.latency_us.append((done - began) * 1e6)
    result.completed += 1


async def run(spec: LoadSpec, go: asyncio.Event | None = None) -> LoadResult:
    """Warm up, wait for `go` (if given), then run the timed phase."""
    raws = [
        build_request(spec.host, spec.port, spec.path, spec.body.encode(), _headers(key)) for key in spec.keys
    ]
    warm_body = (spec.warmup_body or spec.body).encode()
    warm_raws = [
        build_request(spec.host, spec.port, spec.path, warm_body, _headers(key)) for key in spec.keys
    ]
    connections = [Connection(spec.host, spec.port) for _ in range(spec.concurrency)]
    warm = itertools.count()
    await asyncio.gather(
        *(
            _one(
                connection, warm_raws[next(warm) % len(raws)], spec.warmup_body is None and spec.stream, None
            )
            for connection in connections
            for _ in range(spec.warmup)
        )
    )
    if go is not None:
        print("READY", flush=True)
        await go.wait()
    result = LoadResult()
    counter = itertools.count()
    started = perf_counter()
    deadline = started + spec.duration_s if spec.duration_s is not None else None

    async def worker(connection: Connection) -> None:
        while deadline is None or perf_counter() < deadline:
            index = next(counter)
            if spec.requests is not None and index >= spec.requests:
                return
            result.sent += 1
            await _one(connection, raws[index % len(raws)], spec.stream, result)

    await asyncio.gather(*(worker(connection) for connection in connections))
    result.wall_s = perf_counter() - started
    await asyncio.gather(*(connection.close() for connection in connections))
    return result


async def _main(spec: LoadSpec) -> LoadResult:
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.readline(), go.set()))
    try:
        return await run(spec, go)
    finally:
        loop.remove_reader(sys.stdin.fileno())


def main(argv: list[str]) -> int:
    data: dict[str, Any] = json.loads(argv[0])
    result = uvloop.run(_main(LoadSpec(**data)))
    print(json.dumps(result.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
