"""What usage is worth and what it counts against caps (pure arithmetic)."""

from dataclasses import dataclass

from policies.schema import Tier


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as vLLM reports it. `cached_tokens` is part of `prompt_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def value_nano(tier: Tier, usage: Usage) -> int:
    """The value of `usage` at `tier`'s prices, in nano-units of the policy currency.

    Cached prompt tokens are priced at `cached_prompt` when it is set, else at `prompt`.
    """
    prices = tier.prices
    prompt_rate = prices.prompt.nano_per_token if prices.prompt else 0
    cached_rate = prices.cached_prompt.nano_per_token if prices.cached_prompt else prompt_rate
    completion_rate = prices.completion.nano_per_token if prices.completion else 0
    uncached = usage.prompt_tokens - usage.cached_tokens
    return (
        uncached * prompt_rate + usage.cached_tokens * cached_rate + usage.completion_tokens * completion_rate
    )


def counted_tokens(tier: Tier, usage: Usage) -> int:
    """The tokens of `usage` that count against `tier`'s caps."""
    counted = 0
    if tier.counts("prompt"):
        counted += usage.prompt_tokens
    if tier.counts("completion"):
        counted += usage.completion_tokens
    return counted
