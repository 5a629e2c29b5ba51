"""First-come-first-served continuous batching: run-to-completion in arrival order (Orca/vLLM style)."""

from __future__ import annotations

from dataclasses import dataclass

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    PendingTokensScheduler,
    ScheduledWork,
    SchedulerOutput,
)


@dataclass
class _Entry:
    arrival: float
    pending: int  # tokens still to compute before the request can sample; 0 = decoding


class FCFS(PendingTokensScheduler):
    """Requests join the batch in arrival order and keep their place until they leave.

    Each iteration admits requests oldest first while `max_batch_size` and `max_batch_tokens`
    allow; a prefill that does not fit the remaining token budget is chunked. Never preempts.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}  # insertion order = arrival order

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} is already scheduled")
        self._entries[request_id] = _Entry(arrival=now, pending=max(1, num_tokens_to_compute))

    def remove_request(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        scheduled: list[ScheduledWork] = []
        budget = limits.max_batch_tokens
        for request_id, entry in self._entries.items():
            if len(scheduled) == limits.max_batch_size or budget == 0:
                break
            tokens = min(max(entry.pending, 1), budget)
            scheduled.append(ScheduledWork(request_id, tokens))
            budget -= tokens
        return SchedulerOutput(scheduled=tuple(scheduled))

    def update(self, outcome: IterationOutcome) -> None:
        for request_id, tokens in outcome.computed.items():
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.pending = max(0, entry.pending - tokens)

