"""A clairvoyant reference policy for the simulator: it knows every request's output length.

No real engine can run it (output lengths are unknown until a request ends); it bounds what any
size-blind policy such as FCFS or (skip-join) MLFQ could gain on a workload.
"""

from __future__ import annotations

from collections.abc import Mapping

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    RequestScheduler,
    ScheduledWork,
    SchedulerOutput,
)


class ShortestRemainingFirst(RequestScheduler):
    """Preemptive shortest-remaining-output-first, told each request's output length up front.

    `output_tokens` maps request ids to the tokens each will generate. Every iteration runs the
    `max_batch_size` requests with the fewest tokens left (ties by arrival), prefills unchunked
    within the token budget.
    """

    def __init__(self, output_tokens: Mapping[str, int]) -> None:
        self._remaining = dict(output_tokens)
        self._pending: dict[str, int] = {}  # {request_id: prefill tokens still to compute}
        self._order: dict[str, int] = {}
        self._last_ran: frozenset[str] = frozenset()

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        if request_id in self._pending:
            raise ValueError(f"request {request_id!r} is already scheduled")
        if request_id not in self._remaining:
            raise KeyError(f"no output length known for {request_id!r}")
        self._pending[request_id] = max(1, num_tokens_to_compute)
        self._order[request_id] = len(self._order)

    def remove_request(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self._last_ran -= {request_id}

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        ranked = sorted(self._pending, key=lambda rid: (self._remaining[rid], self._order[rid]))
        scheduled: list[ScheduledWork] = []
        budget = limits.max_batch_tokens
        for request_id in ranked:
            if len(scheduled) == limits.max_batch_size or budget == 0:
                break
            tokens = min(max(self._pending[request_id], 1), budget)
            scheduled.append(ScheduledWork(request_id, tokens))
            budget -= tokens
        chosen = {work.request_id for work in scheduled}
        preempted = tuple(sorted(self._last_ran - chosen, key=self._order.__getitem__))
        return SchedulerOutput(scheduled=tuple(scheduled), preempted=preempted)

    def update(self, outcome: IterationOutcome) -> None:
        for request_id, tokens in outcome.computed.items():
            if request_id in self._pending:
                self._pending[request_id] = max(0, self._pending[request_id] - tokens)
        for request_id in outcome.sampled:
            if request_id in self._remaining:
                self._remaining[request_id] -= 1
        self._last_ran = frozenset(rid for rid in outcome.computed if rid in self._pending)

    def skip_cached(self, request_id: str, num_tokens: int) -> None:
        if request_id in self._pending:
            self._pending[request_id] = max(1, self._pending[request_id] - num_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)
