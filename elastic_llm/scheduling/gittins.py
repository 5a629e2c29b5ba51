"""The Gittins index of a request's attained service, from a sample of output lengths.

Among schedulers that do not know job sizes, the Gittins policy (serve the job of highest index)
minimises mean response time in the M/G/1 queue and is near-optimal in the M/G/k (Scully,
Grosof and Harchol-Balter, "The Gittins Policy is Nearly Optimal in the M/G/k under Extremely
General Conditions", SIGMETRICS 2021). For a job that has sampled `a` tokens of a length `S`:

    G(a) = max over b > a of  P(a < S <= b | S > a) / E[min(S, b) - a | S > a]

(chance of finishing within b - a more tokens per token spent trying). Where the hazard rate of
S falls (Pareto), G falls with a and Gittins is least attained service; where it rises, G rises
and Gittins runs a started job to completion like FCFS. Our output-length sample is the
"predictor": `GittinsTable.fit` learns it from the lengths of finished requests.

Pure numpy; no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GittinsTable:
    """`index[a]`: the Gittins index after `a` sampled tokens; beyond the table, the last value."""

    index: tuple[float, ...]  #: G(a) for a = 0 .. longest length - 1 (higher = serve sooner)

    @classmethod
    def fit(cls, lengths: Sequence[int], censored: Sequence[int] = ()) -> GittinsTable:
        """The index table of the distribution of `lengths` (tokens, each >= 1).

        `censored`: requests still running, each with the tokens it has sampled so far (its
        length is at least that plus one). Learning only from finished requests would see the
        short ones first and underrate the tail; the Kaplan-Meier estimate counts the censored
        ones at risk until their attained service. Tail mass beyond the last finished length
        is put one token past the longest censored one. O(L**2) in the longest length L.
        """
        pmf = _kaplan_meier_pmf(lengths, censored)
        longest = len(pmf) - 1
        survival = 1.0 - np.cumsum(pmf)  # survival[t] = P(S > t)
        index = np.zeros(longest)
        for attained in range(longest):
            alive = survival[attained]
            if alive <= 1e-12:
                index[attained] = index[attained - 1] if attained else 0.0
                continue
            finish = np.cumsum(pmf[attained + 1:]) / alive  # P(S <= b | S > a), b = a+1 .. L
            # E[min(S, b) - a | S > a] = sum over t = a .. b-1 of P(S > t | S > a)
            effort = np.cumsum(survival[attained:longest]) / alive
            index[attained] = float(np.max(finish / effort))
        return cls(tuple(float(v) for v in index))

    def __call__(self, attained_tokens: int) -> float:
        """G(attained_tokens); the last entry's value beyond the table."""
        if not self.index:
            return 0.0
        return self.index[min(max(attained_tokens, 0), len(self.index) - 1)]


def _kaplan_meier_pmf(lengths: Sequence[int], censored: Sequence[int]) -> np.ndarray:
    """P(S = t) for t = 0 .. L from finished `lengths` and right-censored `censored` (S > c)."""
    done = np.asarray(lengths, dtype=np.int64)
    cut = np.asarray(censored, dtype=np.int64)
    if done.size == 0 or done.min() < 1 or (cut.size and cut.min() < 0):
        raise ValueError("need at least one length, every length >= 1 and censored >= 0")
    longest = int(max(done.max(), cut.max() + 1 if cut.size else 0))
    events = np.bincount(done, minlength=longest + 1).astype(float)
    # at risk at t: finished at >= t, or still running with more than t - 1 tokens (S >= t)
    exits = events + np.bincount(np.minimum(cut + 1, longest), minlength=longest + 1)
    at_risk = exits[::-1].cumsum()[::-1]
    hazard = np.divide(events, at_risk, out=np.zeros_like(events), where=at_risk > 0)
    survival = np.cumprod(1.0 - hazard)
    pmf = np.clip(-np.diff(np.concatenate(([1.0], survival))), 0.0, None)
    pmf[longest] += survival[longest]  # mass not yet resolved: at the longest horizon
    return pmf


def length_cv(lengths: Sequence[int], censored: Sequence[int] = ()) -> float:
    """Coefficient of variation (std / mean) of the length distribution that `GittinsTable.fit`
    estimates from finished `lengths` and running `censored` requests (Kaplan-Meier)."""
    pmf = _kaplan_meier_pmf(lengths, censored)
    support = np.arange(len(pmf), dtype=float)
    mean = float(pmf @ support)
    variance = float(pmf @ (support - mean) ** 2)
    return float(np.sqrt(max(variance, 0.0)) / mean) if mean > 0 else 0.0
