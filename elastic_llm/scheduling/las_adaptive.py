""""las-adaptive": las-guard whose first tokens and guard adapt to the queue and to the tail.

Measured on issue 20's sweep (docs/benchmarks.md), las-guard pays for its time to first token on
the mean: every newcomer's prefill and first token go ahead of every started request, in a
decode slot of the batch. Where output lengths are close to exponential (ShareGPT-shaped) that
work moved ahead is pure cost (6-9% of mean JCT). And its guard is one setting for every
workload: loose enough for the 1.5x target on CV-3 tails, it breaks the P99 bound on Pareto CV 1.5.
`AdaptiveLAS` keeps las-guard's order (Gittins index of attained tokens, FIFO within a level,
hysteresis, the guard with its starvation bound) and changes five things, each a setting:

- **First tokens in extra slots** (`first_token_slots`, a share of the batch): up to that many
  requests yet to sample their first token, oldest first, run their prefill + first token *beyond* `max_batch_size`; no running
  request is displaced and the iteration grows by the prefill's cost. The regular batch is
  chosen as if there were no newcomer rule. (The engine and the simulator run any batch the
  scheduler returns; the extra entries hold KV as any preempted request does.)
- **A first-token guard** (`first_token_guard_iterations`, off by default): a newcomer that has
  waited that many mean iterations for its first token may take an extra slot beyond
  `first_token_slots`, up to `max_batch_size` extra entries in one iteration. A deep burst's
  first tokens then do not queue one quarter-batch at a time. Measured on the bundled prompt
  sample, whose prompts are long beside their answers (docs/benchmarks.md, issue 20, fifth pass).
- **First tokens only where a queue forms** (`first_token_wait_iterations`): a newcomer gets its
  first token early only once it has waited that many mean iterations (`mean_iteration_s`);
  before, it waits its turn as under FCFS, so a short queue costs nothing.
- **First tokens alone in a burst** (`first_tokens_alone_at`, off by default): once that share
  of the batch waits for its first token, the iteration holds those first tokens (and the
  guarded requests) only. A decode batch beside a burst's prefills makes every prefill iteration
  longer by the whole decode step; running them alone costs the paused requests one fixed
  iteration cost per such iteration.
- **A guard that follows the tail** (`young_guard_heavy`, `tail_cv_light`, `tail_cv_heavy`): the
  slack of requests short of the `guard_quantile` length is `young_guard_factor` x the online
  mean JCT where the coefficient of variation of the known lengths (Kaplan-Meier: the prior,
  finished requests and the running ones censored) is at most `tail_cv_light`, and
  `young_guard_heavy` x it from `tail_cv_heavy` up, linear in between, but only while the
  recent arrivals are bursty (CV of the last `arrival_window` gaps >= `bursty_arrival_cv`). A
  heavier tail has a longer mean residual life: its long requests can wait through bursts and
  still finish within the P99 bound, a lighter one's cannot; under smooth arrivals FCFS's P99 is
  mostly service time and there is no burst wait to absorb the delay.

The starvation bound is las-guard's: guarded requests keep at least half the regular batch and
the guard never exceeds `max_guard_s` (+ `1 + guard_slowdown` x the request's own run time).
Extra first-token slots never take a guarded request's place.

Pure: no clock (`now` is a parameter), no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from elastic_llm.scheduling.base import BatchLimits, SchedulerOutput
from elastic_llm.scheduling.gittins import length_cv
from elastic_llm.scheduling.las import GuardedLAS, LASConfig


@dataclass(frozen=True)
class AdaptiveLASConfig(LASConfig):
    """Settings of `AdaptiveLAS`: las-guard's (`LASConfig`) plus the five adaptive rules."""

    #: extra batch entries per iteration for first tokens, as a share of `max_batch_size` (rounded
    #: up, at least 1); 0: first tokens take a decode slot (las-guard's rule)
    first_token_slots: float = 0.25
    first_token_wait_iterations: float = 0.0  #: a newcomer's first token goes early only after this wait
    #: a newcomer that has waited this many mean iterations for its first token may take an extra
    #: slot beyond `first_token_slots` (at most `max_batch_size` extra entries); 0: never
    first_token_guard_iterations: float = 0.0
    #: once this share of `max_batch_size` (at least one request) waits for its first token, the
    #: iteration holds those first tokens and the guarded requests alone; 0: never
    first_tokens_alone_at: float = 0.0
    young_guard_heavy: float = 6.0  #: `young_guard_factor` on heavy tails (CV >= `tail_cv_heavy`)
    tail_cv_light: float = 2.0  #: up to this length CV the young slack is `young_guard_factor`
    tail_cv_heavy: float = 2.5  #: from this length CV the young slack is `young_guard_heavy`
    bursty_arrival_cv: float = 2.0  #: the heavy-tail slack applies only while arrivals are this bursty
    arrival_window: int = 200  #: recent arrivals whose gaps measure burstiness

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.first_token_slots, self.first_token_wait_iterations, self.first_token_guard_iterations,
               self.first_tokens_alone_at) < 0:
            raise ValueError("first_token_slots, first_token_wait_iterations, first_token_guard_iterations and "
                             "first_tokens_alone_at must be >= 0")
        if not self.young_guard_heavy > 0:
            raise ValueError("young_guard_heavy must be > 0")
        if not 0 <= self.tail_cv_light < self.tail_cv_heavy:
            raise ValueError("need 0 <= tail_cv_light < tail_cv_heavy")
        if self.bursty_arrival_cv < 0 or self.arrival_window < 3:
            raise ValueError("bursty_arrival_cv must be >= 0 and arrival_window >= 3")

    def extra_slots(self, max_batch_size: int) -> int:
        """Extra first-token entries an iteration of `max_batch_size` requests may add."""
        if self.first_token_slots == 0:
            return 0
        return max(1, math.ceil(self.first_token_slots * max_batch_size - 1e-9))

    def young_factor(self, cv: float | None, arrival_cv: float | None = None) -> float:
        """The young slack's multiple of the mean JCT for a length CV of `cv` and an arrival
        (inter-arrival gap) CV of `arrival_cv` (None: unknown, which keeps `young_guard_factor`)."""
        if cv is None or arrival_cv is None or arrival_cv < self.bursty_arrival_cv:
            return self.young_guard_factor
        share = min(1.0, max(0.0, (cv - self.tail_cv_light) / (self.tail_cv_heavy - self.tail_cv_light)))
        return self.young_guard_factor + share * (self.young_guard_heavy - self.young_guard_factor)


class AdaptiveLAS(GuardedLAS):
    """las-guard with first tokens in extra batch slots (optionally only once a newcomer has waited)
    and a guard slack that follows the measured length tail and arrival burstiness."""

    config: AdaptiveLASConfig

    def __init__(self, config: AdaptiveLASConfig | None = None) -> None:
        self._tail_cv: float | None = None
        self._due: frozenset[str] = frozenset()  # newcomers whose first token may go early
        self._extra: frozenset[str] = frozenset()  # requests in extra slots at the last `schedule`
        self._held: frozenset[str] = frozenset()  # started requests paused for first tokens alone
        self._late = 0  # newcomers past the first-token guard at the last `schedule`
        config = config or AdaptiveLASConfig()
        self._arrivals: deque[float] = deque(maxlen=config.arrival_window)  # recent arrival times
        self._arrival_cv: float | None = None  # CV of their gaps (None: too few yet)
        self._arrived = 0  # arrivals seen
        super().__init__(config)

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        """las-guard's, and the arrival joins the burstiness window."""
        super().add_request(request_id, num_tokens_to_compute, now)
        self._arrivals.append(now)
        self._arrived += 1
        if len(self._arrivals) >= 3 and (self._arrived % 8 == 0 or self._arrived == 3):  # refit every 8
            gaps = np.diff(np.asarray(self._arrivals))
            mean = float(gaps.mean())
            self._arrival_cv = float(gaps.std() / mean) if mean > 0 else None

    # ---- RequestScheduler -------------------------------------------------------------------
    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        """The regular batch in las-guard's order, then first tokens of waiting newcomers in up
        to `config.extra_slots(max_batch_size)` extra entries (oldest first)."""
        wait = self.config.first_token_wait_iterations * self.mean_iteration_s()
        self._due = frozenset(rid for rid, e in self._entries.items()
                              if e.attained == 0 and now - e.arrival >= wait)
        self._late = self._past_first_token_guard(now)
        # an extra slot is no incumbent's: nothing to shield or preempt; a request paused for
        # first tokens alone keeps its place as an incumbent
        held = self._held & self._entries.keys()
        self._last_ran = (self._last_ran - self._extra) | held
        output = super().schedule(now, limits)
        if not held:
            return output
        # a held request did not run in the last iteration: not scheduling it now preempts nothing
        return replace(output, preempted=tuple(rid for rid in output.preempted if rid not in held))

    # ---- extensions ---------------------------------------------------------------------------
    def guard_s(self, young: bool = False) -> float:
        """las-guard's slack, with the young factor set by the measured tail (`young_factor`)."""
        config = self.config
        if self._finished == 0:
            return config.max_guard_s
        factor = config.young_factor(self._tail_cv, self._arrival_cv) if young else config.guard_factor
        guard = factor * self._total_jct_s / self._finished
        return min(config.max_guard_s, max(config.min_guard_s, guard))

    def arrival_cv(self) -> float | None:
        """Coefficient of variation of the recent inter-arrival gaps (None: fewer than 3 arrivals)."""
        return self._arrival_cv

    def tail_cv(self) -> float | None:
        """Coefficient of variation of the known output lengths at the last fit (None before)."""
        return self._tail_cv

    # ---- internals ----------------------------------------------------------------------------
    def _fit(self) -> None:
        super()._fit()
        running = [e.attained for e in self._entries.values() if e.attained > 0]
        self._tail_cv = length_cv(self._lengths, censored=running)

    def _early(self, request_id: str) -> bool:
        """Whether the newcomer rule applies to `request_id` in this iteration's regular batch."""
        return self.config.newcomers_first and request_id in self._due and self.config.first_token_slots == 0

    def _choose(self, limits: BatchLimits) -> list[str]:
        chosen = super()._choose(limits)
        slots = self._extra_slot_count(limits)
        self._extra = frozenset()
        if slots == 0 or not self.config.newcomers_first:
            return self._first_tokens_alone(chosen, limits.max_batch_size)
        taken = set(chosen)
        waiting = sorted((rid for rid in self._due if rid not in taken),
                         key=lambda rid: (self._entries[rid].arrival, self._entries[rid].seq))
        self._extra = frozenset(waiting[:slots])
        chosen += waiting[:slots]
        return self._first_tokens_alone(chosen, limits.max_batch_size)

    def _extra_slot_count(self, limits: BatchLimits) -> int:
        """Extra first-token entries this iteration may add: `config.extra_slots`, or as many as
        newcomers wait past the first-token guard (at most `max_batch_size`)."""
        slots = self.config.extra_slots(limits.max_batch_size)
        if slots == 0:
            return 0
        return max(slots, min(self._late, limits.max_batch_size))

    def _past_first_token_guard(self, now: float) -> int:
        """How many due newcomers have waited `first_token_guard_iterations` mean iterations (0
        with the guard off or before any iteration was reported)."""
        iterations = self.config.first_token_guard_iterations
        if iterations == 0 or self._iterations == 0:
            return 0
        limit = iterations * self.mean_iteration_s()
        return sum(1 for rid in self._due if now - self._entries[rid].arrival >= limit)

    def _first_tokens_alone(self, chosen: list[str], max_batch_size: int) -> list[str]:
        """`chosen` less its started, unguarded requests once enough first tokens wait
        (`first_tokens_alone_at`): a burst's prefills then run without a full decode batch beside them."""
        share = self.config.first_tokens_alone_at
        self._held = frozenset()
        if share == 0:
            return chosen
        first = [rid for rid in chosen if self._entries[rid].attained == 0]
        if len(first) < max(1, math.ceil(share * max_batch_size - 1e-9)):
            return chosen
        alone = [rid for rid in chosen if self._entries[rid].attained == 0 or self._entries[rid].guarded]
        self._held = frozenset(chosen) - frozenset(alone)
        return alone
