"""Replay a timed workload against a live engine in real time and record each request's timings.

Requests are added when the wall clock passes their arrival time; the engine steps whenever it has
work and sleeps until the next arrival when it has none. Times are seconds from the replay's start,
and the engine must have been built with `clock=ReplayClock()` bound to the same start (the
`replay` function does that), so queueing before admission is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic_llm.engine.llm_engine import LLMEngine
from elastic_llm.sampling import SamplingParams
from elastic_llm.scheduling.timing import JobTiming


@dataclass(frozen=True)
class TimedRequest:
    """A request of a replayed workload."""

    request_id: str  #: the request
    arrival_s: float  #: seconds from the start of the replay
    prompt_token_ids: tuple[int, ...]  #: the prompt
    params: SamplingParams  #: sampling settings


@dataclass(frozen=True)
class RequestTiming(JobTiming):
    """What happened to one replayed request (times in seconds from the replay's start)."""

    token_ids: tuple[int, ...] = ()  #: generated tokens

    @property
    def per_token_latency_s(self) -> float:
        """Completion time divided by the tokens generated."""
        return self.completion_time_s / max(1, len(self.token_ids))


class ReplayClock:
    """Seconds since `start()` (monotonic)."""

    def __init__(self) -> None:
        self._origin = time.perf_counter()

    def start(self) -> None:
        """Make now zero."""
        self._origin = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self._origin


def replay(make_engine: Callable[[ReplayClock], LLMEngine], requests: Sequence[TimedRequest],
           on_progress: Callable[[int, int], None] | None = None) -> list[RequestTiming]:
    """Build an engine on a fresh replay clock and serve `requests` at their arrival times.

    `on_progress(finished, total)` is called after each request finishes. Returns the timings in
    the order requests finished.
    """
    clock = ReplayClock()
    engine = make_engine(clock)
    pending = sorted(requests, key=lambda r: r.arrival_s)
    arrivals = {r.request_id: r.arrival_s for r in pending}
    timings: list[RequestTiming] = []
    clock.start()
    while pending or engine.has_unfinished():
        now = clock()
        while pending and pending[0].arrival_s <= now:
            request = pending.pop(0)
            engine.add_request(request.request_id, request.prompt_token_ids, request.params)
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        for output in engine.step():
            if output.finished:
                done = engine.pop_completion(output.request_id)
                first = done.first_token_time if done.first_token_time is not None else done.finish_time
                timings.append(RequestTiming(done.request_id, arrivals[done.request_id], first,
                                             done.finish_time, done.token_ids))
                if on_progress is not None:
                    on_progress(len(timings), len(requests))
    return timings
