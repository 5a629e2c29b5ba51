"""Least attained service in tokens, ordered by the Gittins index, with a guard: "las-guard".

Measured on bursty heavy-tailed load (docs/benchmarks.md, issue 20): skip-join MLFQ counts
service in iteration *seconds* (a burst's prefills age every decoding request next to them),
reorders by attained service even where output lengths are close to exponential (ShareGPT-shaped,
CV 1: no size-blind gain on the mean exists there, and P99 doubles), and its starvation
promotion comes after a fixed alpha. This policy:

- **Counts service in sampled tokens.** Level `i` holds requests that sampled
  `[quantum_tokens * (2**i - 1), quantum_tokens * (2**(i+1) - 1))` tokens; level 0 holds the
  requests yet to sample their first token.
- **Orders levels by the Gittins index** (`gittins.GittinsTable`) of a sample of output lengths:
  `prior_lengths` (the bundled sample at the engine's scale: the "predictor") and, with
  `learn_online`, the lengths of finished requests (Kaplan-Meier, running ones censored). Where
  the hazard of the length falls (Pareto) this is least attained service; where it rises
  (ShareGPT-shaped) a started request keeps its place and the order is FCFS's. Until
  `min_samples` lengths are known, lower level first (plain least attained service).
- **FIFO within a level**, so equal requests finish one after another, not all late together.
- **Newcomers first** (`newcomers_first`): a request's prefill and first token come before
  every started request's next token (time to first token), except the guarded half below.
- **Hysteresis.** A request that ran in the last iteration is displaced only by one ranked
  higher (at least `preempt_margin` levels higher without an index), and one iteration displaces
  at most `max_preempt_fraction` of the batch (at least one request).
- **Guard (the starvation bound).** A request is *guarded* when its age exceeds
  `(1 + guard_slowdown) x the seconds it has run + slack`, the slack being `guard_factor` x the
  online mean completion time once it has sampled the `guard_quantile` quantile of known
  lengths, and `young_guard_factor` x that mean before (both clipped to
  [`min_guard_s`, `max_guard_s`]; `max_guard_s` before anything finished). Guarded requests
  come first, oldest first, keep their service, and are owed at least half the batch (rounded
  up). So no request waits longer than `max_guard_s` + 1.1 x its own run time plus the time
  guarded requests that arrived before it take in their half of the batch.

Pure: no clock (`now` is a parameter), no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    PendingTokensScheduler,
    ScheduledWork,
    SchedulerOutput,
)
from elastic_llm.scheduling.gittins import GittinsTable


@dataclass(frozen=True)
class LASConfig:
    """Settings of `GuardedLAS`; validated on construction."""

    quantum_tokens: int = 1  #: width of level 0 in sampled tokens; level i is 2**i times wider
    preempt_margin: int = 1  #: levels a waiting request must be above a running one to displace it
    max_preempt_fraction: float = 1.0  #: most of the batch one iteration may displace (>= 1 request)
    guard_factor: float = 0.25  #: slack of requests past `guard_quantile`: this x online mean JCT
    young_guard_factor: float = 2.0  #: slack of the others: this x online mean JCT
    guard_slowdown: float = 0.1  #: the guard also allows this x the seconds the request has run
    guard_quantile: float = 0.9  #: quantile of the known lengths from which the tight slack applies
    newcomers_first: bool = True  #: a request yet to sample its first token outranks guarded ones
    min_guard_s: float = 1.0  #: the guard never falls below this (seconds)
    max_guard_s: float = 120.0  #: the guard never exceeds this (seconds): the starvation bound
    use_gittins: bool = True  #: order by the Gittins index of the known output lengths (else by level)
    prior_lengths: tuple[int, ...] = ()  #: output lengths known beforehand (a bundled sample)
    refit_every: int = 50  #: refit the index after this many more finished requests
    min_samples: int = 50  #: least attained service until this many lengths are known
    window: int = 2000  #: lengths kept for the fit (most recent)
    learn_online: bool = True  #: finished requests' lengths join the sample (else: the given one only)

    def __post_init__(self) -> None:
        if self.quantum_tokens < 1 or self.preempt_margin < 1:
            raise ValueError("quantum_tokens and preempt_margin must be >= 1")
        if not 0.0 < self.max_preempt_fraction <= 1.0:
            raise ValueError("max_preempt_fraction must be in (0, 1]")
        if not self.guard_factor > 0 or not self.young_guard_factor > 0 or self.guard_slowdown < 0:
            raise ValueError("guard_factor and young_guard_factor must be > 0, guard_slowdown >= 0")
        if any(n < 1 for n in self.prior_lengths):
            raise ValueError("prior_lengths must be >= 1 token each")
        if not 0 < self.min_guard_s <= self.max_guard_s:
            raise ValueError("need 0 < min_guard_s <= max_guard_s")
        if not 0.0 <= self.guard_quantile < 1.0:
            raise ValueError("guard_quantile must be in [0, 1)")
        if min(self.refit_every, self.min_samples, self.window) < 1:
            raise ValueError("refit_every, min_samples and window must be >= 1")

    def level(self, attained_tokens: int) -> int:
        """The level of a request that has sampled `attained_tokens` tokens."""
        return int(math.floor(math.log2(attained_tokens / self.quantum_tokens + 1)))

    def level_start(self, level: int) -> int:
        """Attained tokens at which `level` begins."""
        return self.quantum_tokens * (2**level - 1)


ConfigT = TypeVar("ConfigT", bound="LASConfig")


def widen_config(config: LASConfig, kind: type[ConfigT]) -> ConfigT:
    """`config` as a `kind` (a subclass of its class, e.g. an `AdaptiveLASConfig` from a plain
    `LASConfig`): its fields kept, the subclass's own settings at their defaults."""
    if isinstance(config, kind):
        return config
    return kind(**{f.name: getattr(config, f.name) for f in fields(config)})


@dataclass(frozen=True)
class LASEntryState:
    """A read-only view of one request inside `GuardedLAS` (for tests, logs and dashboards)."""

    request_id: str  #: the request
    level: int  #: level by attained service, 0 = newcomer
    attained_tokens: int  #: tokens it has sampled
    pending_tokens: int  #: tokens still to compute before it can sample; 0 = decoding
    arrival_s: float  #: when it arrived (seconds)
    guarded: bool  #: older than the age guard at the last `schedule`


@dataclass
class _Entry:
    seq: int  # arrival order, the last tie-break
    arrival: float
    pending: int
    attained: int = 0
    served_s: float = 0.0  # seconds of the iterations it ran in
    guarded: bool = False
    length_class: int | None = None  # predicted output-length class ("las-predicted"), None: unknown


class GuardedLAS(PendingTokensScheduler):
    """Token-level preemptive least-attained-service scheduler with an adaptive age guard."""

    def __init__(self, config: LASConfig | None = None) -> None:
        self.config = config or LASConfig()
        self._lengths: list[int] = list(self.config.prior_lengths[-self.config.window:])
        self._since_fit = 0
        self._table: GittinsTable | None = None
        self._guard_tokens = 0  # attained tokens from which the slack guard applies
        self._entries: dict[str, _Entry] = {}  # {request_id: entry}
        self._next_seq = 0
        self._last_ran: frozenset[str] = frozenset()
        self._reserved: frozenset[str] = frozenset()  # the oldest guarded, owed half the batch now
        self._now = 0.0  # end of the last reported iteration (finish time of leavers)
        self._finished = 0  # requests removed after they sampled at least one token
        self._total_jct_s = 0.0  # sum of their completion times
        self._iterations = 0  # iterations reported
        self._busy_s = 0.0  # their total duration (seconds)
        if len(self._lengths) >= self.config.min_samples:
            self._fit()

    # ---- RequestScheduler -------------------------------------------------------------------
    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        """A request arrived (or resumed): it joins level 0 (no service counted yet)."""
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} is already scheduled")
        self._entries[request_id] = _Entry(self._next_seq, now, max(1, num_tokens_to_compute))
        self._next_seq += 1

    def remove_request(self, request_id: str) -> None:
        """Forget a request; one that sampled tokens counts towards the online mean JCT."""
        entry = self._entries.pop(request_id, None)
        if entry is not None and entry.attained > 0:
            self._finished += 1
            self._total_jct_s += max(0.0, self._now - entry.arrival)
            if self.config.learn_online:
                self._learn(entry.attained)
        self._last_ran -= {request_id}

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        """Mark requests older than the guard, then fill the batch in priority order."""
        slack, young = self.guard_s(), self.guard_s(young=True)
        stretch = 1.0 + self.config.guard_slowdown
        for entry in self._entries.values():
            served = stretch * entry.served_s
            age = now - entry.arrival
            long_enough = entry.attained >= self._guard_tokens
            entry.guarded = age > served + (slack if long_enough else young)
        chosen = self._choose(limits)
        scheduled: list[ScheduledWork] = []
        budget = limits.max_batch_tokens
        for request_id in chosen:
            if budget == 0:
                break
            tokens = min(max(self._entries[request_id].pending, 1), budget)
            scheduled.append(ScheduledWork(request_id, tokens))
            budget -= tokens
        names = {work.request_id for work in scheduled}
        preempted = sorted((rid for rid in self._last_ran if rid in self._entries and rid not in names),
                           key=lambda rid: self._entries[rid].seq)
        return SchedulerOutput(scheduled=tuple(scheduled), preempted=tuple(preempted))

    def update(self, outcome: IterationOutcome) -> None:
        """Count computed prefill tokens and one attained token per sampling request."""
        self._now = outcome.now
        self._iterations += 1
        self._busy_s += outcome.duration
        ran = set()
        for request_id, tokens in outcome.computed.items():
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.pending = max(0, entry.pending - tokens)
                entry.served_s += outcome.duration
                ran.add(request_id)
        for request_id in outcome.sampled:
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.attained += 1
                ran.add(request_id)
        self._last_ran = frozenset(ran)


    # ---- extensions ---------------------------------------------------------------------------
    def mark_kv_dropped(self, request_id: str, num_tokens_to_compute: int) -> None:
        """The engine dropped the request's KV: it recomputes `num_tokens_to_compute` tokens first;
        its attained service is kept. Unknown ids are ignored."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.pending = max(1, num_tokens_to_compute)

    def mean_iteration_s(self) -> float:
        """Mean duration of the iterations reported so far (0 before the first)."""
        return self._busy_s / self._iterations if self._iterations else 0.0

    def guard_s(self, young: bool = False) -> float:
        """The guard's slack (seconds): `guard_factor` (`young_guard_factor` if `young`) x the
        online mean JCT, clipped to [min_guard_s, max_guard_s]; max_guard_s before any finished."""
        config = self.config
        if self._finished == 0:
            return config.max_guard_s
        factor = config.young_guard_factor if young else config.guard_factor
        guard = factor * self._total_jct_s / self._finished
        return min(config.max_guard_s, max(config.min_guard_s, guard))

    def state(self, request_id: str) -> LASEntryState:
        """A snapshot of one request; KeyError if unknown."""
        entry = self._entries[request_id]
        return LASEntryState(request_id, self.config.level(entry.attained), entry.attained,
                             entry.pending, entry.arrival, entry.guarded)

    def queue(self) -> tuple[LASEntryState, ...]:
        """Snapshots of all held requests in priority order (guards as at the last `schedule`)."""
        return tuple(self.state(rid) for rid in sorted(self._entries, key=self._key))

    # ---- internals ----------------------------------------------------------------------------
    def _learn(self, length: int) -> None:
        self._lengths.append(length)
        del self._lengths[: -self.config.window]
        self._since_fit += 1
        due = self._table is None or self._since_fit >= self.config.refit_every
        if due and len(self._lengths) >= self.config.min_samples:
            self._fit()
            self._since_fit = 0

    def _fit(self) -> None:
        if self.config.use_gittins:
            running = [e.attained for e in self._entries.values() if e.attained > 0]
            self._table = GittinsTable.fit(self._lengths, censored=running)
        self._guard_tokens = int(np.quantile(self._lengths, self.config.guard_quantile))

    def _rank(self, entry: _Entry) -> float:
        """Lower is sooner: the level, or minus the Gittins index at the level's start."""
        level = self.config.level(entry.attained)
        if self._table is None:
            return float(level)
        return -self._table(self.config.level_start(level))

    def _early(self, request_id: str) -> bool:
        """Whether `request_id`'s first token goes ahead of started requests (the newcomer rule)."""
        return self.config.newcomers_first and self._entries[request_id].attained == 0

    def _key(self, request_id: str) -> tuple[int, float, float, int]:
        entry = self._entries[request_id]
        if entry.guarded:
            return (-1, 0.0, entry.arrival, entry.seq)
        if self._early(request_id):
            return (-2, 0.0, entry.arrival, entry.seq)
        return (0, self._rank(entry), entry.arrival, entry.seq)

    def _choose(self, limits: BatchLimits) -> list[str]:
        """Up to `max_batch_size` requests: the best by priority, with incumbents shielded."""
        size = limits.max_batch_size
        order = sorted(self._entries, key=self._key)
        best = self._reserve_for_guarded(order, size)
        incumbents = [rid for rid in order if rid in self._last_ran]
        evicted = [rid for rid in incumbents if rid not in best]
        if not evicted:
            return best
        # An incumbent keeps its slot unless the newcomer that takes it is `preempt_margin` levels
        # above it (guarded requests always displace), and at most `limit` incumbents go per step.
        limit = max(1, int(self.config.max_preempt_fraction * size))
        newcomers = [rid for rid in best if rid not in self._last_ran]
        kept = list(evicted)  # worst-placed incumbents are displaced first
        taken: list[str] = []
        for newcomer in newcomers:
            if not kept or len(taken) == limit:
                break
            victim = kept[-1]
            if self._displaces(newcomer, victim):
                kept.pop()
                taken.append(newcomer)
        chosen = [rid for rid in best if rid in self._last_ran] + kept
        room = size - len(chosen)
        chosen += [rid for rid in newcomers if rid in taken][:room]
        if len(chosen) < size:  # slots freed by leavers go to the rest in order
            chosen += [rid for rid in newcomers if rid not in chosen][: size - len(chosen)]
        return sorted(chosen, key=self._key)

    def _reserve_for_guarded(self, order: list[str], size: int) -> list[str]:
        """The first `size` of `order`, except that the oldest guarded requests get at least half
        the batch (rounded up) when they want it: newcomers' first tokens cannot starve them."""
        best = order[:size]
        guarded = sorted((rid for rid in order if self._entries[rid].guarded),
                         key=lambda rid: (self._entries[rid].arrival, self._entries[rid].seq))
        reserved = guarded[: (size + 1) // 2]
        self._reserved = frozenset(reserved)
        missing = [rid for rid in reserved if rid not in best]
        if not missing:
            return best
        droppable = [rid for rid in best if rid not in reserved]  # the worst-placed go first
        dropped = set(droppable[len(droppable) - len(missing):])
        return sorted([rid for rid in best if rid not in dropped] + missing, key=self._key)

    def _displaces(self, newcomer: str, incumbent: str) -> bool:
        new, old = self._entries[newcomer], self._entries[incumbent]
        if new.guarded:  # the guarded half's requests first, then the better-placed guarded one
            if newcomer in self._reserved and incumbent not in self._reserved:
                return True
            return not old.guarded or self._key(newcomer) < self._key(incumbent)
        if self._early(newcomer) and old.attained > 0:
            return True  # a first token; `_reserve_for_guarded` kept the guarded their half
        if old.guarded:
            return False
        if self._table is not None:
            return self._rank(new) < self._rank(old)
        gap = self.config.level(old.attained) - self.config.level(new.attained)
        return gap >= self.config.preempt_margin
