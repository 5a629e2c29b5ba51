"""Grace-period arrangement (SpotServe's stateful inference recovery).

At a preemption notice every running batch may decode a few more tokens before it pauses at a
token boundary, as long as the migration that follows (weights as a fixed cost, KV at a rate, see
`MigrationTimeModel`) still ends before ``notice + grace``, keeping a safety margin of
``safety_steps`` decode steps (SpotServe's "- 1").

Rule (all batches pause, then the migration starts): choose the latest common cut-off time at which
the plan still fits; each batch decodes the tokens whose steps end by then (a batch that completes
all its requests simply *finishes*; their KV need not move). If even pausing at once does not fit,
no batch decodes more, and the requests whose KV still fits the remaining window are chosen to
maximise the recompute time saved (0-1 knapsack, solved exactly with `scipy.optimize.milp`); the
others recompute from their prompt + committed tokens on the new placement. If the weights alone
cannot make it, every request recomputes and ``feasible`` is False.

Time is a parameter: ``now`` is passed in, never read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from elastic_llm.planning.errors import PlanningError


@dataclass(frozen=True)
class MigrationTimeModel:
    """How long a migration takes as a function of the KV bytes it must carry."""

    base_seconds: float  #: weights and everything else that does not depend on the KV
    kv_bytes_per_second: float  #: effective rate of KV transfers (math.inf: KV stays in place)

    def seconds(self, kv_bytes: float) -> float:
        """Estimated migration time when ``kv_bytes`` of KV are kept."""
        if math.isinf(self.kv_bytes_per_second):
            return self.base_seconds
        return self.base_seconds + kv_bytes / self.kv_bytes_per_second


@dataclass(frozen=True)
class GracePeriod:
    """A preemption notice."""

    notice_time: float  #: when the notice arrived (seconds, the caller's clock)
    seconds: float = 30.0  #: grace period (GCP / Azure 30 s, AWS 120 s)

    @property
    def deadline(self) -> float:
        """When the instance disappears."""
        return self.notice_time + self.seconds


@dataclass(frozen=True)
class RunningBatch:
    """A replica's running batch as the controller sees it at ``now``."""

    replica: int  #: old replica running the batch
    decode_step_seconds: float  #: seconds of one decode step of this batch
    busy_until: float  #: when its iteration in progress ends (a prefill, or a decode step)

    def __post_init__(self) -> None:
        if self.decode_step_seconds <= 0:
            raise PlanningError("RunningBatch.decode_step_seconds must be > 0")


@dataclass(frozen=True)
class RunningRequest:
    """A request in a running batch."""

    request_id: str  #: request id
    replica: int  #: old replica whose batch holds it
    context_tokens: int  #: tokens of KV cached once the iteration in progress ends
    remaining_tokens: int  #: tokens it still generates after that iteration
    kv_bytes_per_token: int  #: KV bytes one token adds (all layers)
    recompute_seconds: float  #: time to rebuild its KV from prompt + committed tokens


class BatchAction(str, Enum):
    """What a running batch does during the grace period."""

    FINISH = "finish"  #: every request completes before the pause
    DECODE_THEN_PAUSE = "decode_then_pause"  #: decode ``extra_tokens`` more, then pause
    PAUSE_NOW = "pause_now"  #: pause as soon as the iteration in progress ends


@dataclass(frozen=True)
class BatchDecision:
    """The arrangement for one batch."""

    replica: int  #: old replica
    action: BatchAction  #: what it does
    extra_tokens: int  #: decode steps it runs after the iteration in progress
    pause_at: float  #: when it pauses (or finishes)


@dataclass(frozen=True)
class Arrangement:
    """What every running batch and request does before the deadline."""

    now: float  #: when the arrangement was made
    deadline: float  #: notice + grace
    decisions: tuple[BatchDecision, ...]  #: one per batch, in the order given
    keep_kv: tuple[str, ...]  #: requests whose KV migrates; they resume without recompute
    recompute: tuple[str, ...]  #: requests that recompute from prompt + committed tokens
    finished: tuple[str, ...]  #: requests that complete before their batch pauses
    migration_start: float  #: when the last batch pauses
    estimated_end: float  #: migration_start + estimated migration time
    feasible: bool  #: estimated_end + safety margin <= deadline


def arrange(now: float, grace: GracePeriod, batches: Sequence[RunningBatch],
            requests: Sequence[RunningRequest], migration: MigrationTimeModel,
            safety_steps: int = 1) -> Arrangement:
    """Decide how many more tokens each batch decodes and whose KV migrates (module docstring)."""
    if now < grace.notice_time:
        raise PlanningError("now is before the preemption notice")
    index = {b.replica: i for i, b in enumerate(batches)}
    if len(index) != len(batches) or any(r.replica not in index for r in requests):
        raise PlanningError("every request must belong to exactly one listed batch")
    step = np.array([b.decode_step_seconds for b in batches], dtype=float)
    busy = np.array([max(b.busy_until, now) for b in batches], dtype=float)
    of = np.array([index[r.replica] for r in requests], dtype=np.int64)
    remaining = np.array([r.remaining_tokens for r in requests], dtype=np.int64)
    most = np.zeros(len(batches), dtype=np.int64)
    np.maximum.at(most, of, remaining)
    margin = safety_steps * float(step.max(initial=0.0))
    cutoffs = np.unique(np.concatenate(
        [[now], *(busy[d] + step[d] * np.arange(most[d] + 1) for d in range(len(batches)))]))
    steps = _steps_at(cutoffs, busy, step, most)  # (cutoffs, batches)
    kv = _kv_at(steps, requests, of, remaining)  # (cutoffs,)
    start = np.maximum(now, (busy + steps * step).max(axis=1, initial=now))
    end = start + np.array([migration.seconds(x) for x in kv])
    ok = np.flatnonzero(end + margin <= grace.deadline)
    if ok.size:
        best = int(ok[-1])
        chosen = steps[best]
        keep = {r.request_id for r in requests}
        return _result(now, grace, batches, requests, chosen, keep, float(start[best]),
                       float(end[best]), True)
    chosen = np.zeros(len(batches), dtype=np.int64)
    start0 = max(now, float(busy.max(initial=now)))
    window = grace.deadline - margin - start0 - migration.base_seconds
    if window < 0:
        keep: set[str] = set()
    elif math.isinf(migration.kv_bytes_per_second):
        keep = {r.request_id for r in requests}
    else:
        keep = _knapsack(requests, window * migration.kv_bytes_per_second)
    kept_bytes = sum(r.context_tokens * r.kv_bytes_per_token for r in requests if r.request_id in keep)
    finish = start0 + migration.seconds(kept_bytes)
    return _result(now, grace, batches, requests, chosen, keep, start0, finish,
                   finish + margin <= grace.deadline)


def _steps_at(cutoffs: np.ndarray, busy: np.ndarray, step: np.ndarray,
              most: np.ndarray) -> np.ndarray:
    """Decode steps each batch completes by each cut-off: (cutoffs, batches) int array."""
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.floor((cutoffs[:, None] - busy[None, :]) / step[None, :] + 1e-9)
    raw = np.where(np.isfinite(raw), raw, most[None, :])
    return np.clip(raw, 0, most[None, :]).astype(np.int64)


def _kv_at(steps: np.ndarray, requests: Sequence[RunningRequest], of: np.ndarray,
           remaining: np.ndarray) -> np.ndarray:
    """KV bytes of the unfinished requests at each cut-off."""
    if not requests:
        return np.zeros(steps.shape[0])
    done = steps[:, of]  # (cutoffs, requests)
    context = np.array([r.context_tokens for r in requests], dtype=float)
    per_token = np.array([r.kv_bytes_per_token for r in requests], dtype=float)
    alive = remaining[None, :] > done
    return np.where(alive, (context[None, :] + done) * per_token[None, :], 0.0).sum(axis=1)


def _knapsack(requests: Sequence[RunningRequest], capacity: float) -> set[str]:
    """Requests to keep: maximise recompute seconds saved with KV bytes <= ``capacity``."""
    live = [r for r in requests if r.remaining_tokens > 0]
    if not live:
        return set()
    size = np.array([r.context_tokens * r.kv_bytes_per_token for r in live], dtype=float)
    value = np.array([r.recompute_seconds for r in live], dtype=float)
    result = milp(-value, integrality=np.ones(len(live)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(size[None, :], -np.inf, capacity),
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        return set()
    return {r.request_id for r, x in zip(live, result.x, strict=True) if x > 0.5}


def _result(now: float, grace: GracePeriod, batches: Sequence[RunningBatch],
            requests: Sequence[RunningRequest], steps: np.ndarray, keep: set[str],
            start: float, end: float, feasible: bool) -> Arrangement:
    """Assemble the `Arrangement` from per-batch step counts and the kept requests."""
    decisions, finished = [], []
    for d, b in enumerate(batches):
        mine = [r for r in requests if r.replica == b.replica]
        k = int(steps[d])
        done = [r.request_id for r in mine if r.remaining_tokens <= k]
        finished += done
        action = (BatchAction.FINISH if mine and len(done) == len(mine)
                  else BatchAction.DECODE_THEN_PAUSE if k > 0 else BatchAction.PAUSE_NOW)
        pause = max(b.busy_until, now) + k * b.decode_step_seconds
        decisions.append(BatchDecision(b.replica, action, k, pause))
    done_set = set(finished)
    return Arrangement(
        now=now, deadline=grace.deadline, decisions=tuple(decisions),
        keep_kv=tuple(r.request_id for r in requests
                      if r.request_id in keep and r.request_id not in done_set),
        recompute=tuple(r.request_id for r in requests
                        if r.request_id not in keep and r.request_id not in done_set),
        finished=tuple(finished), migration_start=start, estimated_end=end, feasible=feasible,
    )
