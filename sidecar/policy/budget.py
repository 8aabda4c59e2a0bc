"""`budget:` and `prices:` on an LLM service: tokens or money per calendar window.

A budget is an amount per calendar window in UTC (`2M/day`, `50/month`): like
LiteLLM's and OpenAI's budgets it resets at the start of each hour, day (00:00
UTC) or month (the 1st, 00:00 UTC), not on a sliding window, so "when does it
reset" has one answer an agent and a finance team agree on.

A cost budget counts money from `prices:`, per model, per input and output
token. It must have a `default` price: a model the table does not name would
otherwise be free, and a budget meant to cap spend would not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema, model_validator

from .base import Model, RedisUrl

WINDOWS = ("hour", "day", "month")
_WINDOW_NAMES = {"h": "hour", "hour": "hour", "d": "day", "day": "day", "month": "month"}
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9}

_ALLOWANCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMB]?)\s*/\s*(h|hour|d|day|month)\s*$")
ALLOWANCE_PATTERN = r"^\d+(\.\d+)?[kKMB]?/(h|hour|d|day|month)$"
_PRICE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([kKMB]?)\s*$")
PRICE_PATTERN = r"^\d+(\.\d+)?/(\d+(\.\d+)?)?[kKMB]?$"


@dataclass(frozen=True, slots=True)
class Allowance:
    """An amount per calendar window, and the text it was written as."""

    amount: float
    window: str  # hour | day | month
    text: str

    def __str__(self) -> str:
        return self.text


def parse_allowance(value: object) -> Allowance:
    """'2M/day' -> Allowance(2e6, 'day'); K, M and B scale by 1e3, 1e6, 1e9."""
    if isinstance(value, Allowance):
        return value
    if isinstance(value, str):
        m = _ALLOWANCE.match(value)
        if m:
            amount = float(m.group(1)) * _SCALE[m.group(2)]
            if amount > 0:
                return Allowance(amount, _WINDOW_NAMES[m.group(3)], value.strip())
    raise ValueError(
        f"{value!r} is not a budget; write an amount per calendar window (UTC) like "
        "'2M/day', '500K/hour' or '50/month'"
    )


def parse_price(value: object) -> float:
    """'2.50/1M' -> the price of one token (2.5e-6)."""
    if isinstance(value, str):
        m = _PRICE.match(value)
        if m and (m.group(2) or m.group(3)):
            per = float(m.group(2) or 1) * _SCALE[m.group(3)]
            if per > 0:
                return float(m.group(1)) / per
    raise ValueError(
        f"{value!r} is not a price; write it per a number of tokens, like '2.50/1M' or '0.15/1K'"
    )


AllowanceValue = Annotated[
    Allowance,
    BeforeValidator(parse_allowance),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": ALLOWANCE_PATTERN, "examples": ["2M/day", "50/month"]}
    ),
]
PriceValue = Annotated[
    float,
    BeforeValidator(parse_price),
    WithJsonSchema({"type": "string", "pattern": PRICE_PATTERN, "examples": ["2.50/1M"]}),
]


class Price(Model):
    input: PriceValue = Field(description="Per input (prompt) token, written like '2.50/1M'")
    output: PriceValue = Field(description="Per output (completion) token, like '10/1M'")


# Model name (or a glob like 'gpt-4o*') -> its price; `default` prices every other model.
Prices = dict[Annotated[str, Field(min_length=1, max_length=256)], Price]


class Budget(Model):
    tokens: AllowanceValue | None = Field(
        default=None,
        description="LLM tokens (input + output) per calendar window in UTC, like '2M/day'",
    )
    cost: AllowanceValue | None = Field(
        default=None,
        description="Money (in the currency of `prices`) per calendar window in UTC, like '50/day'",
    )
    per: Literal["service", "agent"] = Field(
        default="service", description="One budget for the service, or one per agent"
    )
    backend: RedisUrl | None = Field(
        default=None,
        description="redis://host:port/db to share the budget between sidecars (else it is "
        "kept in the sidecar's data dir)",
    )
    fail_open: bool = Field(
        default=True, description="When the backend is unreachable: let calls through (true)"
    )

    @model_validator(mode="after")
    def _tokens_or_cost(self) -> Budget:
        if (self.tokens is None) == (self.cost is None):
            raise ValueError("set either tokens or cost")
        return self

    @property
    def allowance(self) -> Allowance:
        found = self.tokens or self.cost
        if found is None:
            raise ValueError("a budget has tokens or cost")
        return found

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens is not None else "cost"

    def describe(self) -> str:
        """Like 'tokens 2M/day per agent': the metric label and the admin view's name."""
        return f"{self.unit} {self.allowance} per {self.per}"
