"""Prices as exact integers.

Money is kept in nano-units of the policy's currency (1e-9) so that every sum in Redis and in
Python is an exact integer. A price is written `"<amount> <CUR>/<1K|1M>"`, e.g. `"0.50 USD/1M"`
(per million tokens); amounts finer than one nano-unit per token are refused.
"""

import re
from decimal import Decimal

NANO = Decimal(10) ** 9
_SCALES = {"1K": 1_000, "1M": 1_000_000}
_PRICE = re.compile(
    r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<currency>[A-Z]{3})\s*/\s*(?P<scale>1K|1M)(?:\s*tokens)?\s*$"
)
_AMOUNT = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<currency>[A-Z]{3})\s*$")


class PriceError(ValueError):
    """A price string that cannot be read exactly."""


def parse_token_price(text: object) -> tuple[int, str]:
    """Read `"0.50 USD/1M"` into (nano-units per token, currency)."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise PriceError(f"price without unit: {text!r}; write it as e.g. '0.50 USD/1M' (per million tokens)")
    match = _PRICE.match(text)
    if match is None:
        raise PriceError(f"cannot read price {text!r}; write it as e.g. '0.50 USD/1M' or '0.002 USD/1K'")
    per_token = Decimal(match["amount"]) * NANO / _SCALES[match["scale"]]
    if per_token != per_token.to_integral_value():
        raise PriceError(f"price {text!r} is finer than one nano-{match['currency']} per token")
    return int(per_token), match["currency"]


def parse_amount(text: object) -> tuple[Decimal, str]:
    """Read a plain amount such as `"12.50 USD"` into (amount, currency)."""
    if not isinstance(text, str) or (match := _AMOUNT.match(text)) is None:
        raise PriceError(f"cannot read amount {text!r}; write it as e.g. '12.50 USD'")
    return Decimal(match["amount"]), match["currency"]


def nano_to_decimal(nano: int) -> Decimal:
    """Nano-units as a currency amount."""
    return Decimal(nano) / NANO
