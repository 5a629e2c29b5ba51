"""Skip-join multi-level feedback queue (FastServe), with plain MLFQ selectable by a flag.

Levels run from 0 (highest priority) to `num_levels - 1`. Level i's quantum is
`base_quantum_s * 2**i` seconds of attained service; the bottom level's quantum is unbounded.
Quanta are wall-clock seconds of iterations a request took part in, never iteration counts.

The rules, in the order they act:

- **Join.** Skip-join puts a new request at the highest level whose quantum covers its predicted
  prefill time (the bottom level if none does), skipping the levels above; plain MLFQ
  (`skip_join=False`) puts every request at level 0.
- **Service.** Every request that ran in an iteration attains that iteration's `duration`.
- **Demotion.** A request whose attained service reaches its level's quantum moves one level down
  with its attained service reset to zero, and joins the tail of its new level.
- **Starvation prevention.** A request that has not run for longer than `starvation_alpha_s`
  (counted from its arrival or its last iteration) is promoted to level 0 with attained service
  reset, queued by when it started waiting (so ahead of later arrivals at level 0).
- **Batch formation.** Requests are taken in priority order while `max_batch_size` and
  `max_batch_tokens` allow; a prefill larger than the remaining token budget is chunked.
- **Hysteresis.** Within a level the order is FIFO by the time a request entered the level
  (arrival, demotion or promotion). An *incumbent* (a request that ran in the previous iteration
  and was not demoted by it) and a request just promoted by starvation prevention can only be
  displaced by a request at least `preempt_margin` levels higher (default 1: any strictly higher
  level). So an equal-level newcomer never preempts a running request, a preempted request resumes
  ahead of later arrivals at its level, and a demoted request goes behind its new level's queue.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    PendingTokensScheduler,
    ScheduledWork,
    SchedulerOutput,
)


@dataclass(frozen=True)
class MLFQConfig:
    """Settings of `SkipJoinMLFQ`; validated on construction.

    Choose `base_quantum_s` near one decode iteration of the engine: far above the prefill times
    the predictor returns, every request skip-joins level 0 and skip-join degenerates to plain MLFQ.
    """

    base_quantum_s: float = 0.01  #: quantum of level 0 (seconds); level i gets base * 2**i
    num_levels: int = 12  #: number of levels; the bottom one never demotes
    starvation_alpha_s: float = 3.0  #: promote a request that waited longer than this (seconds)
    skip_join: bool = True  #: False: every request joins level 0 (plain MLFQ)
    preempt_margin: int = 1  #: levels a waiting request must be above an incumbent to displace it

    def __post_init__(self) -> None:
        if not self.base_quantum_s > 0:
            raise ValueError("base_quantum_s must be > 0")
        if self.num_levels < 1:
            raise ValueError("num_levels must be >= 1")
        if not self.starvation_alpha_s > 0:
            raise ValueError("starvation_alpha_s must be > 0 (math.inf disables promotion)")
        if self.preempt_margin < 1:
            raise ValueError("preempt_margin must be >= 1")

    def quantum(self, level: int) -> float:
        """Attained service (seconds) that demotes a request at `level`; inf at the bottom."""
        if level >= self.num_levels - 1:
            return math.inf
        return self.base_quantum_s * 2.0**level

    def join_level(self, predicted_prefill_s: float) -> int:
        """Highest level whose quantum covers `predicted_prefill_s` (skip-join's entry level)."""
        for level in range(self.num_levels):
            if self.quantum(level) >= predicted_prefill_s:
                return level
        return self.num_levels - 1  # unreachable: the bottom quantum is inf; kept for clarity


@dataclass(frozen=True)
class QueueEntryState:
    """A read-only view of one request inside the MLFQ (for tests, logs and dashboards)."""

    request_id: str  #: the request
    level: int  #: current level, 0 = highest priority
    attained_s: float  #: service attained at the current level (seconds)
    pending_tokens: int  #: tokens still to compute before it can sample; 0 = decoding
    waiting_since: float  #: end of its last iteration, or its arrival (seconds)
    protected: bool  #: incumbent or just promoted: only `preempt_margin` higher levels displace it


@dataclass
class _Entry:
    seq: int  # arrival order, the last tie-break
    level: int
    queue_key: float  # when it entered its current level's queue (FIFO order within a level)
    pending: int  # tokens still to compute before it can sample; 0 = decoding
    last_service: float  # end of its last iteration, or arrival; starts the starvation clock
    attained: float = 0.0  # seconds of service at the current level
    boosted: bool = False  # promoted by starvation prevention and not run since


class SkipJoinMLFQ(PendingTokensScheduler):
    """Token-level preemptive scheduler: skip-join MLFQ, or plain MLFQ with `skip_join=False`.

    `predict_prefill_s(prompt_tokens) -> seconds` places new requests (required for skip-join,
    ignored by plain MLFQ): a cost model's prefill term or `LinearPrefillPredictor`.
    """

    def __init__(
        self,
        config: MLFQConfig | None = None,
        predict_prefill_s: Callable[[int], float] | None = None,
    ) -> None:
        self.config = config or MLFQConfig()
        if self.config.skip_join and predict_prefill_s is None:
            raise ValueError("skip-join needs predict_prefill_s (or skip_join=False: plain MLFQ)")
        self._predict = predict_prefill_s
        self._entries: dict[str, _Entry] = {}  # {request_id: entry}
        self._next_seq = 0
        self._last_ran: frozenset[str] = frozenset()  # requests in the last reported iteration
        self._incumbents: frozenset[str] = frozenset()  # _last_ran minus those it demoted

    # ---- RequestScheduler -------------------------------------------------------------------
    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        """A request arrived (or resumed); it joins its skip-join level (level 0 for plain MLFQ)."""
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} is already scheduled")
        tokens = max(1, num_tokens_to_compute)
        level = 0
        if self.config.skip_join:
            assert self._predict is not None
            level = self.config.join_level(self._predict(tokens))
        self._entries[request_id] = _Entry(
            seq=self._next_seq, level=level, queue_key=now, pending=tokens, last_service=now
        )
        self._next_seq += 1

    def remove_request(self, request_id: str) -> None:
        """Forget a finished, aborted or exported request; unknown ids are ignored."""
        self._entries.pop(request_id, None)
        self._last_ran -= {request_id}  # a later request reusing the id starts afresh
        self._incumbents -= {request_id}

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        """Promote starving requests, then fill the batch from the highest level down."""
        self._promote_starving(now)
        scheduled: list[ScheduledWork] = []
        budget = limits.max_batch_tokens
        for request_id in self._priority_order():
            if len(scheduled) == limits.max_batch_size or budget == 0:
                break
            tokens = min(max(self._entries[request_id].pending, 1), budget)
            scheduled.append(ScheduledWork(request_id, tokens))
            budget -= tokens
        chosen = {work.request_id for work in scheduled}
        preempted = sorted(
            (rid for rid in self._last_ran if rid in self._entries and rid not in chosen),
            key=lambda rid: self._entries[rid].seq,
        )
        return SchedulerOutput(scheduled=tuple(scheduled), preempted=tuple(preempted))

    def update(self, outcome: IterationOutcome) -> None:
        """Charge `outcome.duration` to every request that ran, then demote those out of quantum."""
        ran = {rid for rid in (*outcome.computed, *outcome.sampled) if rid in self._entries}
        demoted: set[str] = set()
        for request_id in ran:
            entry = self._entries[request_id]
            entry.pending = max(0, entry.pending - outcome.computed.get(request_id, 0))
            entry.attained += outcome.duration
            entry.last_service = outcome.now
            entry.boosted = False
            if entry.attained >= self.config.quantum(entry.level):
                entry.level += 1
                entry.attained = 0.0
                entry.queue_key = outcome.now
                demoted.add(request_id)
        self._last_ran = frozenset(ran)
        self._incumbents = frozenset(ran - demoted)


    # ---- extensions ---------------------------------------------------------------------------
    def mark_kv_dropped(self, request_id: str, num_tokens_to_compute: int) -> None:
        """The engine dropped the request's KV (recompute mode): it must recompute
        `num_tokens_to_compute` tokens (prompt + committed) before it samples again. Its level and
        attained service are kept. Unknown ids are ignored."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.pending = max(1, num_tokens_to_compute)

    def state(self, request_id: str) -> QueueEntryState:
        """A snapshot of one request's place in the queues; KeyError if unknown."""
        entry = self._entries[request_id]
        return QueueEntryState(
            request_id=request_id,
            level=entry.level,
            attained_s=entry.attained,
            pending_tokens=entry.pending,
            waiting_since=entry.last_service,
            protected=self._protected(request_id),
        )

    def queue(self) -> tuple[QueueEntryState, ...]:
        """Snapshots of all held requests in current priority order (no promotion applied)."""
        return tuple(self.state(rid) for rid in self._priority_order())

    def estimate_next_scheduled(self, now: float, limits: BatchLimits) -> dict[str, float]:
        """Estimated time (seconds, absolute) each held request is next scheduled.

        FastServe's estimate: the sooner of its starvation promotion and the time the requests
        ahead of it will run first. A request ahead at level l runs, before one at level L, the rest
        of its quantum at l plus the quanta of levels l+1 .. L-1 (it then falls behind); requests
        are assumed not to finish early (no output-length prediction), the batch has
        `max_batch_size` parallel slots and the token budget is ignored. Call after `schedule`:
        the first `max_batch_size` requests in priority order get `now`.
        """
        order = self._priority_order()
        start: dict[str, float] = {}
        for level in sorted({self._entries[rid].level for rid in order}):
            start.update(self._queueing_delays(order, level, limits.max_batch_size))
        estimates: dict[str, float] = {}
        for rid in order:
            entry = self._entries[rid]
            promote_in = math.inf
            if entry.level > 0 or not entry.boosted:
                promote_in = max(0.0, entry.last_service + self.config.starvation_alpha_s - now)
            estimates[rid] = now + min(start[rid], promote_in)
        return estimates

    # ---- internals ----------------------------------------------------------------------------
    def _protected(self, request_id: str) -> bool:
        return request_id in self._incumbents or self._entries[request_id].boosted

    def _priority_order(self) -> list[str]:
        """Held requests, highest priority first: (effective level, queue entry time, arrival)."""
        shield = self.config.preempt_margin - 0.5

        def key(request_id: str) -> tuple[float, float, int]:
            entry = self._entries[request_id]
            level = entry.level - shield if self._protected(request_id) else float(entry.level)
            return (level, entry.queue_key, entry.seq)

        return sorted(self._entries, key=key)

    def _promote_starving(self, now: float) -> None:
        alpha = self.config.starvation_alpha_s
        for request_id, entry in self._entries.items():
            if request_id in self._incumbents or entry.boosted:
                continue
            if now - entry.last_service > alpha:
                entry.level = 0
                entry.attained = 0.0
                entry.queue_key = entry.last_service  # waited longest -> first among level 0
                entry.boosted = True

    def _service_ahead(self, entry: _Entry, level: int) -> float:
        """Service `entry` gets before it falls behind a request queued at `level`."""
        rest = self.config.quantum(entry.level) - entry.attained
        for lower in range(entry.level + 1, level):
            rest += self.config.quantum(lower)
        return max(0.0, rest)

    def _queueing_delays(self, order: list[str], level: int, slots: int) -> dict[str, float]:
        """Seconds until each request at `level` starts, list-scheduling `order` on `slots`."""
        free_at: list[float] = []  # heap of times the batch slots free up
        delays: dict[str, float] = {}
        last = max(i for i, rid in enumerate(order) if self._entries[rid].level == level)
        for request_id in order[: last + 1]:
            entry = self._entries[request_id]
            begin = 0.0 if len(free_at) < slots else heapq.heappop(free_at)
            if entry.level == level:
                delays[request_id] = begin
            heapq.heappush(free_at, begin + self._service_ahead(entry, level))
        return delays
