"""A tiny fake executor: drives a scheduler with fixed-cost iterations, one token per request."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elastic_llm.scheduling import BatchLimits, IterationOutcome, RequestScheduler, SchedulerOutput


@dataclass
class FakeRequest:
    """A request as the fake engine sees it."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    to_compute: int = -1  # tokens still to compute before it samples (-1: not yet arrived)
    generated: int = 0
    finished_s: float | None = None
    first_token_s: float | None = None
    ran_iterations: list[float] = field(default_factory=list)  # start time of each iteration


def step(
    scheduler: RequestScheduler,
    requests: dict[str, FakeRequest],
    output: SchedulerOutput,
    now: float,
    duration: float,
) -> IterationOutcome:
    """Execute `output` on the fake requests and report the outcome (does not remove finished)."""
    computed: dict[str, int] = {}
    sampled: list[str] = []
    for work in output.scheduled:
        req = requests[work.request_id]
        computed[work.request_id] = work.num_tokens
        req.ran_iterations.append(now)
        if req.to_compute > 0:
            assert work.num_tokens <= req.to_compute
            req.to_compute -= work.num_tokens
            if req.to_compute > 0:
                continue
        else:
            assert work.num_tokens == 1
        req.generated += 1
        sampled.append(work.request_id)
        if req.first_token_s is None:
            req.first_token_s = now + duration
    outcome = IterationOutcome(now + duration, duration, computed, tuple(sampled))
    scheduler.update(outcome)
    return outcome


def run(
    scheduler: RequestScheduler,
    workload: Sequence[FakeRequest],
    limits: BatchLimits,
    iteration_s: Callable[[SchedulerOutput], float] | float,
    horizon_s: float,
) -> dict[str, FakeRequest]:
    """Run until every request finished or `horizon_s` passed; returns the requests by id."""
    arrivals = sorted(workload, key=lambda r: r.arrival_s)
    requests = {r.request_id: r for r in arrivals}
    now, nxt = 0.0, 0
    while now <= horizon_s:
        while nxt < len(arrivals) and arrivals[nxt].arrival_s <= now:
            req = arrivals[nxt]
            req.to_compute = req.prompt_tokens
            scheduler.add_request(req.request_id, req.prompt_tokens, now)
            nxt += 1
        output = scheduler.schedule(now, limits)
        if not output.scheduled:
            if nxt == len(arrivals):
                break
            now = arrivals[nxt].arrival_s
            continue
        duration = iteration_s(output) if callable(iteration_s) else iteration_s
        step(scheduler, requests, output, now, duration)
        now += duration
        for work in output.scheduled:
            req = requests[work.request_id]
            if req.generated == req.output_tokens and req.finished_s is None:
                req.finished_s = now
                scheduler.remove_request(req.request_id)
    return requests
