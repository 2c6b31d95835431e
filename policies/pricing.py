"""What usage is worth and what it counts against caps (pure arithmetic)."""

from dataclasses import dataclass

from policies.schema import Tier


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as vLLM reports it. `cached_tokens` is part of `prompt_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Rates:
    """A tier's prices for one model in nano-units of the policy currency per token. The only place prices are
    derived: settlement applies them here, and the reaper's Lua applies the same three numbers,
    carried in each reservation record, to what it last observed."""

    prompt: int
    cached_prompt: int
    completion: int

    @classmethod
    def of(cls, tier: Tier, model: str) -> "Rates":
        """`model`'s rates at `tier` (its own prices over the tier's defaults). Cached prompt
        tokens cost `cached_prompt` when it is set, else `prompt`."""
        prices = tier.prices.for_model(model)
        prompt = prices.prompt.nano_per_token if prices.prompt else 0
        cached = prices.cached_prompt.nano_per_token if prices.cached_prompt else prompt
        completion = prices.completion.nano_per_token if prices.completion else 0
        return cls(prompt, cached, completion)

    def value(self, usage: Usage) -> int:
        uncached = usage.prompt_tokens - usage.cached_tokens
        return (
            uncached * self.prompt
            + usage.cached_tokens * self.cached_prompt
            + usage.completion_tokens * self.completion
        )


def value_nano(tier: Tier, model: str, usage: Usage) -> int:
    """The value of `usage` of `model` at `tier`'s prices, in nano-units of the policy currency."""
    return Rates.of(tier, model).value(usage)


def counted_tokens(tier: Tier, usage: Usage) -> int:
    """The tokens of `usage` that count against `tier`'s caps."""
    counted = 0
    if tier.counts("prompt"):
        counted += usage.prompt_tokens
    if tier.counts("completion"):
        counted += usage.completion_tokens
    return counted
