"""A lower bound on the P99 time to first token that no order of one engine's iterations can beat.

Issue 20 asks for a TTFT P99 at least 5x better than FCFS's wherever queues form. On some rows
of its sweep every policy, however it orders the batch, stops short of that. This module makes
the reason a number: `ttft_p99_floor` bounds the TTFT P99 of *any* schedule of a workload on an
engine whose iterations take `IterationTimeModel` seconds and compute at most
`max_batch_tokens` tokens, so `fcfs_ttft_p99 / floor` bounds the gain any scheduler can show.

Two bounds, the larger one counts (both only drop work, so both hold for every schedule):

- **No wait.** A request's first token needs its whole prompt computed: at least
  `ceil(prompt / max_batch_tokens)` iterations of its own, each paying the fixed and per-request
  terms, plus the per-token term for every prompt token, even on an idle engine.
- **A burst.** Take the requests arriving in a window `[a, b]`. The k-th of them to get its first
  token, in any order, finishes no sooner than `a` plus the least work of any k of their
  prefills (the k shortest prompts, in as few iterations as the token budget allows); the ones
  served after it, at least `len - k + 1` requests, finish later still and arrived by `b`.

A percentile is a count: P99 >= x as soon as `n - floor(0.99 (n - 1))` requests (5 of 400) have a
TTFT >= x (`numpy.percentile`'s linear interpolation never goes below the lower neighbour). The
decode iterations in flight, the order within a burst and other work are ignored, so the true
floor lies higher. Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from elastic_llm.scheduling.workloads import WorkloadItem
from elastic_llm.sim.scheduling import IterationTimeModel


def prefill_work_s(prompt_tokens: int, requests: int, model: IterationTimeModel, max_batch_tokens: int) -> float:
    """The least time in which `requests` prefills of `prompt_tokens` prompt tokens in all can
    complete: as few iterations as the token budget allows, each request in at least one."""
    if max_batch_tokens < 1 or requests < 1 or prompt_tokens < requests:
        raise ValueError("need max_batch_tokens >= 1, requests >= 1 and a token per request at least")
    iterations = math.ceil(prompt_tokens / max_batch_tokens)
    return iterations * model.fixed_s + max(requests, iterations) * model.per_request_s + model.per_token_s * prompt_tokens


def ttft_p99_floor(workload: Sequence[WorkloadItem], model: IterationTimeModel, max_batch_tokens: int,
                   quantile: float = 0.99) -> float:
    """A lower bound (seconds) on the `quantile` time to first token of any schedule of
    `workload` (see the module's docstring). O(n^2 log n) in the number of requests."""
    if not workload:
        raise ValueError("the workload is empty")
    if not 0 <= quantile <= 1:
        raise ValueError("quantile must be in [0, 1]")
    n = len(workload)
    need = n - math.floor(quantile * (n - 1))  # requests at or above x make the percentile >= x
    alone = sorted((prefill_work_s(i.prompt_tokens, 1, model, max_batch_tokens) for i in workload), reverse=True)
    floor = alone[need - 1]
    items = sorted(workload, key=lambda i: i.arrival_s)
    for start in range(n - need + 1):
        largest: list[int] = []  # min-heap of the need - 1 longest prompts of the window
        total = 0
        for end in range(start, n):
            prompt = items[end].prompt_tokens
            total += prompt
            heapq.heappush(largest, prompt)
            if len(largest) > need - 1:
                heapq.heappop(largest)
            count = end - start + 1
            if count < need:
                continue
            k = count - need + 1  # the k-th served and the need - 1 after it finish at or after this
            work = prefill_work_s(total - sum(largest), k, model, max_batch_tokens)
            floor = max(floor, items[start].arrival_s + work - items[end].arrival_s)
    return floor
