"""The usage event: one per request, written to the ledger at settlement (pure data)."""

import json
from dataclasses import asdict, dataclass

LEDGER_FIELDS = (
    "request_id",
    "user",
    "tier",
    "model",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "value_nano",
    "finish_reason",
    "ttft_ms",
    "duration_ms",
    "ts_ms",
)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """What one request used and is worth. `counted` is what counts against caps (not stored)."""

    request_id: str
    user: str
    tier: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    value_nano: int
    counted: int
    finish_reason: str
    ttft_ms: float | None
    duration_ms: float
    ts_ms: int

    def ledger_fields(self) -> list[str]:
        """Flat field/value pairs for XADD, in `LEDGER_FIELDS` order."""
        flat: list[str] = []
        for name in LEDGER_FIELDS:
            value = getattr(self, name)  # the fields are flat: no deep copy as `asdict` makes
            flat += [name, "" if value is None else _text(value)]
        return flat

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
