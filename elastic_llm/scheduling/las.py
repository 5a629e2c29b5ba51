"""Least attained service in tokens, with an age guard: the "las-guard" policy.

Measured on bursty heavy-tailed load (docs/benchmarks.md, issue 20), skip-join MLFQ gained little
on mean JCT and lost up to 1.8x on P99: service counted in iteration *seconds* charged every
decoding request for the prefills of a burst's newcomers, and starvation promotion (after a fixed
alpha, resetting the level) arrived too late for the long requests and then sent them back down.
This policy keeps what made MLFQ good (newcomers first, least-served first) and changes the rest:

- **Service in tokens.** A request's attained service is the number of tokens it has *sampled*
  (output tokens), not the seconds of the iterations it sat in: a long prefill next to it does not
  age it. Level `i` holds requests with attained service in
  `[quantum_tokens * (2**i - 1), quantum_tokens * (2**(i+1) - 1))`: level 0 is the newcomers.
- **Order.** Lower level first; within a level, arrival order (FIFO, not round-robin, so equal
  requests finish one after another instead of all late together).
- **Hysteresis.** A request that ran in the last iteration is displaced only by one at least
  `preempt_margin` levels above it, and one iteration displaces at most
  `max_preempt_fraction` of the batch (at least one request): a burst cannot evict the whole
  running batch at once.
- **Age guard (the starvation bound).** A request older than the guard (`now - arrival`) is
  *guarded*: guarded requests come before every unguarded one but newcomers (whose first token
  comes first), oldest first, keep their attained service, and are owed at least half the batch. The guard is `guard_factor` x the mean completion time of the requests
  finished so far (measured online, so it follows the load), clipped to
  [`min_guard_s`, `max_guard_s`], plus `1 + guard_slowdown` x the time the request has been
  served (its attained tokens x the mean iteration). So no request waits beyond that guard plus
  the time the guarded requests that arrived before it take in their half of the batch.

Pure: no clock (`now` is a parameter), no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from collections.abc import Sequence

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    RequestScheduler,
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
    guard_factor: float = 2.0  #: the guard's slack = this x the online mean completion time
    guard_slowdown: float = 0.2  #: the guard also allows this x the time the request has been served
    newcomers_first: bool = True  #: a request yet to sample its first token outranks guarded ones
    min_guard_s: float = 1.0  #: the guard never falls below this (seconds)
    max_guard_s: float = 120.0  #: the guard never exceeds this (seconds): the starvation bound
    learn_lengths: bool = True  #: order by the Gittins index of the finished requests' lengths
    refit_every: int = 50  #: refit the index after this many more finished requests
    min_samples: int = 50  #: least attained service until this many lengths are known
    window: int = 2000  #: lengths kept for the fit (most recent)

    def __post_init__(self) -> None:
        if self.quantum_tokens < 1 or self.preempt_margin < 1:
            raise ValueError("quantum_tokens and preempt_margin must be >= 1")
        if not 0.0 < self.max_preempt_fraction <= 1.0:
            raise ValueError("max_preempt_fraction must be in (0, 1]")
        if not self.guard_factor > 0 or self.guard_slowdown < 0:
            raise ValueError("guard_factor must be > 0 and guard_slowdown >= 0")
        if not 0 < self.min_guard_s <= self.max_guard_s:
            raise ValueError("need 0 < min_guard_s <= max_guard_s")
        if min(self.refit_every, self.min_samples, self.window) < 1:
            raise ValueError("refit_every, min_samples and window must be >= 1")

    def level(self, attained_tokens: int) -> int:
        """The level of a request that has sampled `attained_tokens` tokens."""
        return int(math.floor(math.log2(attained_tokens / self.quantum_tokens + 1)))

    def level_start(self, level: int) -> int:
        """Attained tokens at which `level` begins."""
        return self.quantum_tokens * (2**level - 1)


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
    guarded: bool = False


class GuardedLAS(RequestScheduler):
    """Token-level preemptive least-attained-service scheduler with an adaptive age guard."""

    def __init__(self, config: LASConfig | None = None, lengths: Sequence[int] = ()) -> None:
        """`lengths`: output lengths (tokens) known beforehand, e.g. a bundled sample at the
        engine's scale; with `learn_lengths` the finished requests' lengths join them."""
        self.config = config or LASConfig()
        self._lengths: list[int] = [int(n) for n in lengths if n >= 1][-self.config.window:]
        self._since_fit = 0
        self._table: GittinsTable | None = None
        if len(self._lengths) >= self.config.min_samples:
            self._table = GittinsTable.fit(self._lengths)
        self._entries: dict[str, _Entry] = {}  # {request_id: entry}
        self._next_seq = 0
        self._last_ran: frozenset[str] = frozenset()
        self._now = 0.0  # end of the last reported iteration (finish time of leavers)
        self._finished = 0  # requests removed after they sampled at least one token
        self._total_jct_s = 0.0  # sum of their completion times
        self._iterations = 0  # iterations reported
        self._busy_s = 0.0  # their total duration (seconds)

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
            if self.config.learn_lengths:
                self._learn(entry.attained)
        self._last_ran -= {request_id}

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        """Mark requests older than the guard, then fill the batch in priority order."""
        slack = self.guard_s()
        per_token = self.mean_iteration_s() * (1.0 + self.config.guard_slowdown)
        for entry in self._entries.values():
            entry.guarded = now - entry.arrival > slack + per_token * entry.attained
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
                ran.add(request_id)
        for request_id in outcome.sampled:
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.attained += 1
                ran.add(request_id)
        self._last_ran = frozenset(ran)

    def skip_cached(self, request_id: str, num_tokens: int) -> None:
        """Cached prefix KV shortened the request's prefill; its service is unchanged."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.pending = max(1, entry.pending - num_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

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

    def guard_s(self) -> float:
        """The guard's slack (seconds): guard_factor x online mean JCT, clipped to
        [min_guard_s, max_guard_s] (max_guard_s before any request finished)."""
        config = self.config
        if self._finished == 0:
            return config.max_guard_s
        guard = config.guard_factor * self._total_jct_s / self._finished
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
            self._table = GittinsTable.fit(self._lengths)
            self._since_fit = 0

    def _rank(self, entry: _Entry) -> float:
        """Lower is sooner: the level, or minus the Gittins index at the level's start."""
        level = self.config.level(entry.attained)
        if self._table is None:
            return float(level)
        return -self._table(self.config.level_start(level))

    def _key(self, request_id: str) -> tuple[int, float, float, int]:
        entry = self._entries[request_id]
        if entry.guarded:
            return (-1, 0.0, entry.arrival, entry.seq)
        if self.config.newcomers_first and entry.attained == 0:
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
        """The first `size` of `order`, except that guarded requests get at least half the batch
        (rounded up) when they want it: newcomers' first tokens cannot starve them."""
        best = order[:size]
        guarded = [rid for rid in order if self._entries[rid].guarded]
        missing = [rid for rid in guarded[: (size + 1) // 2] if rid not in best]
        if not missing:
            return best
        others = [rid for rid in best if not self._entries[rid].guarded]
        dropped = set(others[len(others) - len(missing):])
        return sorted([rid for rid in best if rid not in dropped] + missing, key=self._key)

    def _displaces(self, newcomer: str, incumbent: str) -> bool:
        new, old = self._entries[newcomer], self._entries[incumbent]
        if new.guarded:  # the older guarded request first
            return not old.guarded or self._key(newcomer) < self._key(incumbent)
        if self.config.newcomers_first and new.attained == 0 < old.attained:
            return True  # a first token; `_reserve_for_guarded` kept the guarded their half
        if old.guarded:
            return False
        if self._table is not None:
            return self._rank(new) < self._rank(old)
        gap = self.config.level(old.attained) - self.config.level(new.attained)
        return gap >= self.config.preempt_margin
