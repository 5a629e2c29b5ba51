"""Discrete-event replay of a request workload through one engine's iteration loop.

The simulated engine runs the *same* `RequestScheduler` classes as `LLMEngine`; only the time an
iteration takes comes from a model (`IterationTimeModel`, fitted from measurements of the live
engine) instead of a forward pass. Use it to explore policies, loads and settings in seconds
before spending an hour of real engine time on one of them.

Pure: no torch, no dask, no clock. Time is simulated seconds from the workload's start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic_llm.scheduling.base import BatchLimits, IterationOutcome, RequestScheduler
from elastic_llm.scheduling.timing import JobTiming
from elastic_llm.scheduling.workloads import WorkloadItem


@dataclass(frozen=True)
class IterationTimeModel:
    """Seconds one iteration takes: `fixed_s + per_request_s * batch + per_token_s * tokens`.

    `batch` is the number of requests in the iteration and `tokens` the number of tokens computed
    (one per decoding request plus every prefill token), so a decode-only batch of b requests takes
    `fixed_s + (per_request_s + per_token_s) * b`.
    """

    fixed_s: float  #: per-iteration cost independent of the batch (weights streamed, overheads)
    per_request_s: float  #: extra cost per request in the batch
    per_token_s: float  #: extra cost per token computed

    def __post_init__(self) -> None:
        if min(self.fixed_s, self.per_request_s, self.per_token_s) < 0 or not (
            self.fixed_s + self.per_request_s + self.per_token_s > 0
        ):
            raise ValueError("iteration time terms must be >= 0 and not all zero")

    def __call__(self, batch: int, tokens: int) -> float:
        return self.fixed_s + self.per_request_s * batch + self.per_token_s * tokens


@dataclass(frozen=True)
class SimulatedTiming(JobTiming):
    """What happened to one request in a simulated run (seconds from the workload's start)."""

    output_tokens: int = 0  #: tokens generated
    preemptions: int = 0  #: iterations it was running in and then paused


@dataclass
class _Live:
    item: WorkloadItem
    prefill_owed: int  # prompt tokens not yet computed
    generated: int = 0
    first_token_s: float = math.nan
    preemptions: int = 0


def simulate(
    scheduler: RequestScheduler,
    workload: Sequence[WorkloadItem],
    iteration_time: Callable[[int, int], float],
    limits: BatchLimits,
) -> list[SimulatedTiming]:
    """Run `workload` to completion under `scheduler`; returns one timing per request, in order.

    Each iteration: admit arrivals up to `now`, ask the scheduler for a batch, advance the clock
    by `iteration_time(batch_size, tokens)`, report the outcome. A request samples a token in the
    iteration that completes its prefill and in each decode iteration after that, and leaves when
    it has `output_tokens` tokens. An idle engine jumps to the next arrival.
    """
    pending = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    ids = [f"r{i}" for i in range(len(workload))]
    live: dict[str, _Live] = {}
    done: dict[str, SimulatedTiming] = {}
    now = 0.0
    cursor = 0
    while len(done) < len(workload):
        while cursor < len(pending) and workload[pending[cursor]].arrival_s <= now:
            index = pending[cursor]
            item = workload[index]
            live[ids[index]] = _Live(item, prefill_owed=item.prompt_tokens)
            if item.prompt_token_ids:
                scheduler.note_prompt(ids[index], item.prompt_token_ids)
            scheduler.add_request(ids[index], item.prompt_tokens, item.arrival_s)
            cursor += 1
        decision = scheduler.schedule(now, limits)
        if not decision.scheduled:
            if cursor >= len(pending):
                raise RuntimeError("scheduler returned an empty batch with requests still unfinished")
            now = max(now, workload[pending[cursor]].arrival_s)
            continue
        for request_id in decision.preempted:
            live[request_id].preemptions += 1
        duration = iteration_time(len(decision.scheduled), decision.num_tokens)
        now += duration
        computed: dict[str, int] = {}
        sampled: list[str] = []
        for work in decision.scheduled:
            state = live[work.request_id]
            computed[work.request_id] = work.num_tokens
            state.prefill_owed -= work.num_tokens
            if state.prefill_owed <= 0:  # decoding, or this chunk finished the prompt
                sampled.append(work.request_id)
        scheduler.update(IterationOutcome(now, duration, computed, tuple(sampled)))
        for request_id in sampled:
            state = live[request_id]
            state.generated += 1
            if state.generated == 1:
                state.first_token_s = now
            if state.generated >= state.item.output_tokens:
                scheduler.remove_request(request_id)
                del live[request_id]
                done[request_id] = SimulatedTiming(
                    request_id, state.item.arrival_s, state.first_token_s, now,
                    state.generated, state.preemptions,
                )
    return [done[request_id] for request_id in ids]

