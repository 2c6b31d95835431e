"""A small parser for the Prometheus text exposition format (enough for tests)."""

from __future__ import annotations

import re
from collections.abc import Mapping

SampleKey = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[SampleKey, float]

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse(text: str) -> Samples:
    """Parse exposition text into ``{(name, frozenset(labels.items())): value}``.

    Comment and blank lines are skipped; a malformed sample line raises ``ValueError``.
    """
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample: {line!r}")
        labels = _parse_labels(match["labels"] or "")
        samples[(match["name"], frozenset(labels.items()))] = float(match["value"])
    return samples


def sample_sum(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum the samples called ``name`` over all label sets that include ``labels``."""
    wanted = set((labels or {}).items())
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and wanted <= sample_labels
    )


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text.rstrip()):
        match = _LABEL.match(text, position)
        if match is None:
            raise ValueError(f"malformed labels: {text!r}")
        labels[match[1]] = re.sub(r"\\.", lambda m: _ESCAPES.get(m[0], m[0]), match[2])
        position = match.end()
    return labels
