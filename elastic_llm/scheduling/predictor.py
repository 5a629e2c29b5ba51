"""Prefill-time predictors for skip-join: `prompt_tokens -> seconds`.

Skip-join MLFQ places a new request by its predicted prefill time. Any callable with the
`PrefillPredictor` signature works (a cost model's prefill term, a measured profile); this module
provides the simplest useful one, a straight line fitted from measured (tokens, seconds) samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class PrefillPredictor(Protocol):
    """Predicts the seconds one request's prefill of `prompt_tokens` tokens takes."""

    def __call__(self, prompt_tokens: int) -> float: ...


@dataclass(frozen=True)
class LinearPrefillPredictor:
    """`seconds = intercept_s + per_token_s * prompt_tokens`, never negative."""

    intercept_s: float  #: fixed cost of one prefill (seconds)
    per_token_s: float  #: marginal cost of one more prompt token (seconds)

    def __post_init__(self) -> None:
        if self.intercept_s < 0 or self.per_token_s < 0:
            raise ValueError("intercept_s and per_token_s must be >= 0")

    def __call__(self, prompt_tokens: int) -> float:
        """Predicted prefill seconds for `prompt_tokens` tokens."""
        return self.intercept_s + self.per_token_s * max(0, prompt_tokens)

    @classmethod
    def fit(cls, samples: Iterable[tuple[int, float]]) -> LinearPrefillPredictor:
        """Least-squares line through measured `(prompt_tokens, seconds)` samples.

        A negative fitted intercept is refitted through the origin; a negative slope (noise on a
        too-narrow range of lengths) falls back to a constant at the mean. Raises ValueError on no
        samples or negative values.
        """
        pairs = np.asarray(list(samples), dtype=float).reshape(-1, 2)
        if len(pairs) == 0:
            raise ValueError("need at least one (prompt_tokens, seconds) sample")
        if (pairs < 0).any():
            raise ValueError("samples must be non-negative")
        tokens, seconds = pairs[:, 0], pairs[:, 1]
        if np.ptp(tokens) > 0:
            slope, intercept = (float(v) for v in np.polyfit(tokens, seconds, 1))
            if slope >= 0 and intercept >= 0:
                return cls(intercept, slope)
            if slope >= 0:  # negative intercept: refit through the origin
                return cls(0.0, float(tokens @ seconds / (tokens @ tokens)))
        elif tokens[0] > 0:  # one prompt length only: proportional
            return cls(0.0, float(seconds.mean() / tokens[0]))
        return cls(float(seconds.mean()), 0.0)
