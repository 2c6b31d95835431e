"""`python -m bench.gateway.relay_parse`: what reading a stream chunk's usage costs, capgate's way
(`proxy.relay.split_usage`: only the usage object's bytes, parsed by orjson) against the standard
library's `raw_decode` of everything after `,"usage":` (`split_usage_decoding`, what it replaces),
on the chunks of a captured vLLM stream with continuous usage. Prints ns per chunk for each and
checks that both give the same answer."""

import json
import timeit

from bench.common.capture import DEFAULT_CAPTURE
from proxy.relay import split_usage, split_usage_decoding

ROUNDS = 5


def captured_payloads() -> list[bytes]:
    """The JSON payloads of the captured stream that carries usage on every chunk."""
    capture = json.loads(DEFAULT_CAPTURE.read_text())
    stream = next(r for r in capture["replies"] if r["stream"] and r["usage"] == "continuous")
    return [e[6:].encode() for e in stream["events"] if e.startswith("data: {")]


def main() -> None:
    payloads = captured_payloads()
    for payload in payloads:
        assert split_usage(payload) == split_usage_decoding(payload), payload
    for name, split in (("orjson, usage bytes only", split_usage), ("json.raw_decode", split_usage_decoding)):
        best = min(timeit.repeat(lambda split=split: [split(p) for p in payloads], number=200, repeat=ROUNDS))
        print(f"{name:26} {best / 200 / len(payloads) * 1e9:8.0f} ns per chunk ({len(payloads)} chunks)")


if __name__ == "__main__":
    main()
