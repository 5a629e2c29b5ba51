"""KV residency policy: which requests' KV caches live in device memory (pure, no I/O).

Preemptive scheduling keeps many started requests alive, so their KV caches can outgrow the
device. Each iteration this policy reads the batch the scheduler chose, every request's KV size,
where each cache is now, and the scheduler's estimate of when each request runs next, and decides:

- the batch must be resident: swap in its members whose KV is on the host; if even the batch
  alone exceeds the device budget, defer its lowest-priority members until it fits;
- every other request is ranked by estimated next scheduled time (soonest first; a resident one
  is favoured by `hysteresis_s` so that near-ties do not swap back and forth) and kept on device
  greedily while it fits under the limit; the rest leave the device, latest-scheduled first;
- `proactive=True` (FastServe): the limit is the budget minus a reserve fraction kept free for
  new arrivals, and host-resident requests that fit are prefetched ahead of their turn (swap
  mode). `proactive=False` (reactive): the limit is the whole budget and nothing is prefetched.
- `mode="swap"` moves evicted KV to host memory; `mode="recompute"` drops it (vLLM-like), and the
  engine calls `SkipJoinMLFQ.mark_kv_dropped` so the request recomputes prompt + committed tokens.

The decision is data; the engine carries it out (swap_out and drop, then swap_in, then prefetch)
and can overlap prefetches with the iteration's compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Literal, Protocol

from elastic_llm.scheduling.base import BatchLimits, SchedulerOutput


@dataclass(frozen=True)
class ResidencyConfig:
    """Settings of `KVResidencyPolicy`; validated on construction."""

    device_budget_bytes: int  #: device memory the KV caches of all requests may occupy
    reserve_fraction: float = 0.1  #: proactive: share of the budget kept free for new arrivals
    mode: Literal["swap", "recompute"] = "swap"  #: where evicted KV goes: host memory, or nowhere
    proactive: bool = True  #: keep the reserve and prefetch (FastServe); False: evict only on need
    hysteresis_s: float = 0.0  #: a resident request counts as due this much sooner when ranked

    def __post_init__(self) -> None:
        if self.device_budget_bytes < 0:
            raise ValueError("device_budget_bytes must be >= 0")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise ValueError("reserve_fraction must be in [0, 1)")
        if self.mode not in ("swap", "recompute"):
            raise ValueError("mode must be 'swap' or 'recompute'")
        if self.hysteresis_s < 0:
            raise ValueError("hysteresis_s must be >= 0")

    @property
    def keep_limit_bytes(self) -> int:
        """Device bytes up to which non-batch requests are kept or prefetched."""
        if not self.proactive:
            return self.device_budget_bytes
        return math.floor(self.device_budget_bytes * (1.0 - self.reserve_fraction))


@dataclass(frozen=True)
class ResidencyDecision:
    """What the engine must do with KV caches before (and while) running one iteration."""

    swap_out: tuple[str, ...] = ()  #: device -> host, latest-scheduled first
    drop: tuple[str, ...] = ()  #: recompute mode: discard the KV, latest-scheduled first
    swap_in: tuple[str, ...] = ()  #: host -> device for this batch, in batch order: blocking
    prefetch: tuple[str, ...] = ()  #: host -> device ahead of their turn, soonest first
    deferred: tuple[str, ...] = ()  #: batch members that do not fit: leave them out this time
    device_bytes: int = 0  #: device KV bytes once carried out and the batch has run

    @classmethod
    def empty(cls) -> ResidencyDecision:
        """Nothing to move."""
        return cls()


class KVResidencyPolicy:
    """Decides KV residency from the batch, KV sizes, locations and next-scheduled estimates."""

    def __init__(self, config: ResidencyConfig) -> None:
        self.config = config

    def decide(
        self,
        batch: Sequence[str],
        kv_bytes: Mapping[str, int],
        on_host: Set[str],
        next_scheduled: Mapping[str, float],
    ) -> ResidencyDecision:
        """Decide one iteration's KV moves.

        `batch`: this iteration's requests in priority order. `kv_bytes`: {request: bytes} for every
        request the engine holds (with or without KV yet); for batch members the bytes after this
        iteration's new tokens, for the others their current bytes. `on_host`: requests whose KV
        is in host memory now (all others in `kv_bytes` are on device). `next_scheduled`:
        {request: absolute seconds} from the scheduler (missing: never). Guarantees
        `device_bytes <= device_budget_bytes`.
        """
        unknown = [rid for rid in batch if rid not in kv_bytes]
        if unknown:
            raise ValueError(f"batch requests without kv_bytes: {unknown}")
        budget = self.config.device_budget_bytes
        must = list(batch)
        deferred: list[str] = []
        while must and sum(kv_bytes[rid] for rid in must) > budget:
            deferred.insert(0, must.pop())
        used = sum(kv_bytes[rid] for rid in must)
        kept, fetched = self._rank_and_keep(set(must), kv_bytes, on_host, next_scheduled, used)
        used += sum(kv_bytes[rid] for rid in (*kept, *fetched))

        def later_first(rid: str) -> tuple[float, str]:
            return (-next_scheduled.get(rid, math.inf), rid)

        leaving = sorted(
            (rid for rid in kv_bytes if rid not in on_host and rid not in kept and rid not in must),
            key=later_first,
        )
        leaving = [rid for rid in leaving if kv_bytes[rid] > 0]
        swap_mode = self.config.mode == "swap"
        return ResidencyDecision(
            swap_out=tuple(leaving) if swap_mode else (),
            drop=() if swap_mode else tuple(leaving),
            swap_in=tuple(rid for rid in must if rid in on_host),
            prefetch=tuple(fetched),
            deferred=tuple(deferred),
            device_bytes=used,
        )

    def _rank_and_keep(
        self,
        must: set[str],
        kv_bytes: Mapping[str, int],
        on_host: Set[str],
        next_scheduled: Mapping[str, float],
        used: int,
    ) -> tuple[list[str], list[str]]:
        """Greedy by next scheduled time: (residents kept, host requests prefetched)."""
        prefetching = self.config.proactive and self.config.mode == "swap"
        hysteresis = self.config.hysteresis_s

        def soonest_first(rid: str) -> tuple[float, int, str]:
            resident = rid not in on_host
            due = next_scheduled.get(rid, math.inf) - (hysteresis if resident else 0.0)
            return (due, 0 if resident else 1, rid)

        room = self.config.keep_limit_bytes - used
        kept: list[str] = []
        fetched: list[str] = []
        for rid in sorted((r for r in kv_bytes if r not in must), key=soonest_first):
            size = kv_bytes[rid]
            if rid in on_host and not prefetching:
                continue
            if size <= room:
                (fetched if rid in on_host else kept).append(rid)
                room -= size
        return kept, fetched


class SupportsNextScheduled(Protocol):
    """A scheduler that can estimate when each of its requests is next scheduled."""

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput: ...

    def estimate_next_scheduled(self, now: float, limits: BatchLimits) -> dict[str, float]: ...


def check_residency_scheduler(scheduler: object, config: ResidencyConfig) -> None:
    """Raise ValueError unless `scheduler` can drive a residency policy of `config`: it must
    estimate next scheduled times, and in recompute mode be told of dropped KV
    (`mark_kv_dropped`). Called by the engine, and early by whoever configures one."""
    if not hasattr(scheduler, "estimate_next_scheduled"):
        raise ValueError("a KV residency budget needs a scheduler that estimates next scheduled "
                         f"times (SkipJoinMLFQ); {type(scheduler).__name__} does not")
    if config.mode == "recompute" and not hasattr(scheduler, "mark_kv_dropped"):
        raise ValueError(f"recompute mode needs a scheduler with mark_kv_dropped; "
                         f"{type(scheduler).__name__} has none")


def attach_residency(output: SchedulerOutput, decision: ResidencyDecision) -> SchedulerOutput:
    """`output` without the deferred requests and with the decision's KV moves filled in."""
    deferred = set(decision.deferred)
    return dataclasses.replace(
        output,
        scheduled=tuple(w for w in output.scheduled if w.request_id not in deferred),
        swap_out=decision.swap_out,
        drop=decision.drop,
        swap_in=decision.swap_in,
        prefetch=decision.prefetch,
    )


def plan_iteration(
    scheduler: SupportsNextScheduled,
    policy: KVResidencyPolicy,
    *,
    now: float,
    limits: BatchLimits,
    kv_tokens: Mapping[str, int],
    kv_bytes_per_token: int,
    on_host: Set[str],
) -> SchedulerOutput:
    """One engine step's decision: schedule, estimate next times, decide residency, attach.

    `kv_tokens`: {request: tokens whose KV is held now (0 if none or dropped)} for every request
    the engine holds; `kv_bytes_per_token`: device KV bytes per token (all layers held here).
    """
    output = scheduler.schedule(now, limits)
    growth = {work.request_id: work.num_tokens for work in output.scheduled}
    kv_bytes = {
        rid: (tokens + growth.get(rid, 0)) * kv_bytes_per_token for rid, tokens in kv_tokens.items()
    }
    decision = policy.decide(
        batch=[work.request_id for work in output.scheduled],
        kv_bytes=kv_bytes,
        on_host=on_host,
        next_scheduled=scheduler.estimate_next_scheduled(now, limits),
    )
    return attach_residency(output, decision)
