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
    def fit(cls, lengths: Sequence[int]) -> GittinsTable:
        """The index table of the empirical distribution of `lengths` (tokens, each >= 1).

        O(L**2) in the longest length L (a 1,500-token tail: about 2 M operations)."""
        values = np.asarray(lengths, dtype=np.int64)
        if values.size == 0 or values.min() < 1:
            raise ValueError("need at least one length, every length >= 1")
        longest = int(values.max())
        pmf = np.bincount(values, minlength=longest + 1).astype(float) / values.size
        survival = 1.0 - np.cumsum(pmf)  # survival[t] = P(S > t)
        index = np.zeros(longest)
        for attained in range(longest):
            alive = survival[attained]
            if alive <= 0:
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
