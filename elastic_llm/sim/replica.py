"""One simulated replica: its requests, its batch, and iteration times from the cost model.

The simulator (`elastic_llm.sim.fleet`) owns the clock; a `SimReplica` only says what its next
iteration runs and how long it takes (`IterationClock`, from the planning core's `CostModel` over
a measured profile), and applies an iteration's outcome. Two batching modes:

- ``static`` (SpotServe's artifact ran FasterTransformer with ``--old-batching``): up to B requests
  start together with one prefill and the batch decodes until every one of them has finished;
- ``continuous``: every iteration the batch is topped up to B, newcomers' prefill joining it.

With a `scheduler` (one of `elastic_llm.scheduling`'s, e.g. FastServe's skip-join MLFQ), that
scheduler picks each iteration's batch instead (token-level preemption: a paused request keeps
its KV). A request that arrives with its KV (migrated, handed over) needs no prefill; one resumed
from its committed tokens without KV recomputes prompt + committed tokens in its prefill. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import SPOTSERVE_OVERHEAD, CostModel
from elastic_llm.planning.profiles import InstanceProfile, Phase
from elastic_llm.scheduling.base import BatchLimits, IterationOutcome, RequestScheduler

Batching = Literal["static", "continuous"]


class IterationClock:
    """Seconds of one prefill or decode step of a (P, M) replica at batch b (cost model, cached).

    Args:
        spec: the served model.
        profile: measured per-layer times (SpotServe's or ``elastic-llm profile`` output).
        prompt_tokens: the prompt length the prefill times are for.
        overhead: SpotServe's final fudge factor on every phase.
    """

    def __init__(self, spec: ModelSpec, profile: InstanceProfile, prompt_tokens: int = 512,
                 overhead: float = SPOTSERVE_OVERHEAD) -> None:
        self.model = CostModel(spec, profile, Workload(input_len=prompt_tokens, output_len=128), overhead=1.0)
        self.prompt_tokens = prompt_tokens
        self.overhead = overhead
        self._degrees = tuple(sorted(profile.tensor_degrees()))
        self._cache: dict[tuple[Phase, int, int, int], float] = {}

    def _phase(self, phase: Phase, p: int, m: int, b: int) -> float:
        key = (phase, p, m, b)
        if key not in self._cache:
            tensor = max((d for d in self._degrees if d <= m), default=self._degrees[0])
            config = ParallelConfig(1, min(p, self.model.model.num_layers), tensor, b)
            self._cache[key] = self.model.phase(config, phase).total * self.overhead
        return self._cache[key]

    def decode_step(self, parallel: tuple[int, int], batch: int) -> float:
        """One decode step (one token for each of `batch` requests)."""
        return self._phase(Phase.DECODE, parallel[0], parallel[1], max(1, batch))

    def prefill(self, parallel: tuple[int, int], tokens: list[int]) -> float:
        """One prefill of requests with these context lengths (scaled from the profiled prompt)."""
        if not tokens:
            return 0.0
        mean = sum(tokens) / len(tokens)
        return self._phase(Phase.PREFILL, parallel[0], parallel[1], len(tokens)) * mean / self.prompt_tokens


@dataclass
class SimRequest:
    """A request as a simulated replica holds it."""

    request_id: str  #: its id
    prompt_len: int  #: prompt tokens
    max_new: int  #: output tokens wanted
    done: int  #: output tokens produced so far (committed)
    has_kv: bool  #: its KV cache is here (no prefill needed)

    @property
    def context(self) -> int:
        """Tokens cached once its KV is built."""
        return self.prompt_len + self.done


@dataclass
class Iteration:
    """What one iteration ran: the requests that got a token, and how long it took."""

    seconds: float  #: its duration
    requests: list[SimRequest]  #: every request that produced a token
    prefilled: int  #: how many of them were prefilled in it
    computed: dict[str, int] = field(default_factory=dict)  #: (scheduler) request -> tokens computed


@dataclass
class SimReplica:
    """One replica of the simulated fleet."""

    replica_id: str  #: the control layer's id
    leader: str  #: its leader worker
    workers: tuple[str, ...]  #: every worker it runs on
    parallel: tuple[int, int]  #: its (P, M)
    max_batch: int  #: B
    batching: Batching  #: static or continuous
    ready: bool = False  #: takes iterations (built, not reloading)
    paused: bool = False  #: paused for a migration or a reshard
    waiting: list[SimRequest] = field(default_factory=list)  #: requests not in the batch yet
    batch: list[SimRequest] = field(default_factory=list)  #: the running batch
    iterating: bool = False  #: an iteration is under way
    iterations: int = 0  #: iterations run
    busy_s: float = 0.0  #: seconds spent in iterations
    epoch: int = 0  #: reshards done
    #: what waits for the next token boundary (a pause for a migration or a reshard)
    at_boundary: list[Callable[[], None]] = field(default_factory=list)
    scheduler: RequestScheduler | None = None  #: picks each iteration's batch (None: `batching`)

    def holds(self, request_id: str) -> bool:
        """Whether the request is here (waiting or in the batch)."""
        return any(r.request_id == request_id for r in (*self.waiting, *self.batch))

    def add(self, request: SimRequest, now: float = 0.0) -> None:
        """Take a request (replacing an older copy of it) at time `now`."""
        self.remove(request.request_id)
        self.waiting.append(request)
        if self.scheduler is not None:
            self.scheduler.add_request(request.request_id, 1 if request.has_kv else request.context, now)

    def remove(self, request_id: str) -> SimRequest | None:
        """Drop the request; it is returned if it was here."""
        if self.scheduler is not None and request_id in self.scheduler:
            self.scheduler.remove_request(request_id)
        for pool in (self.waiting, self.batch):
            for index, request in enumerate(pool):
                if request.request_id == request_id:
                    return pool.pop(index)
        return None

    def clear(self) -> None:
        """Drop every request (a reload)."""
        for request in (*self.waiting, *self.batch):
            self.remove(request.request_id)
        self.waiting, self.batch = [], []

    def next_iteration(self, clock: IterationClock, now: float = 0.0) -> Iteration | None:
        """Form the next iteration's batch at time `now` (None: nothing to run)."""
        if not self.ready or self.paused:
            return None
        computed: dict[str, int] = {}
        if self.scheduler is not None:
            decision = self.scheduler.schedule(now, BatchLimits(self.max_batch, 1 << 30))
            pool = {r.request_id: r for r in (*self.batch, *self.waiting)}
            computed = {w.request_id: w.num_tokens for w in decision.scheduled if w.request_id in pool}
            self.batch = [pool[i] for i in computed]
            self.waiting = [r for i, r in pool.items() if i not in computed]
        elif self.batching == "continuous" or not self.batch:
            room = self.max_batch - len(self.batch)
            self.batch.extend(self.waiting[:room])
            del self.waiting[:room]
        if not self.batch:
            return None
        fresh = [r for r in self.batch if not r.has_kv]
        decoding = len(self.batch) - len(fresh)
        seconds = clock.prefill(self.parallel, [r.context for r in fresh])
        if decoding:
            seconds += clock.decode_step(self.parallel, decoding)
        return Iteration(max(seconds, 1e-6), list(self.batch), len(fresh), computed)

    def finish_iteration(self, iteration: Iteration, now: float = 0.0) -> list[SimRequest]:
        """Apply an iteration that ran: one token each; the requests that are done leave the batch.
        Returns the requests it advanced that are still here (the others were moved or cancelled
        meanwhile)."""
        self.iterating = False
        self.iterations += 1
        self.busy_s += iteration.seconds
        advanced = [r for r in iteration.requests if r in self.batch]
        for request in advanced:
            request.has_kv = True
            request.done = min(request.max_new, request.done + 1)
        if self.scheduler is not None:
            ran = {r.request_id for r in advanced}
            self.scheduler.update(IterationOutcome(now, iteration.seconds,
                                                   {i: n for i, n in iteration.computed.items() if i in ran},
                                                   tuple(r.request_id for r in advanced)))
            for request in advanced:
                if request.done >= request.max_new:
                    self.scheduler.remove_request(request.request_id)
        self.batch = [r for r in self.batch if r.done < r.max_new]
        return advanced


def kv_bytes(spec: ModelSpec, request: SimRequest) -> int:
    """KV bytes of one request's cache."""
    return spec.kv_bytes_per_token * request.context


def weight_bytes_per_worker(spec: ModelSpec, parallel: tuple[int, int]) -> int:
    """Weight bytes one worker of a (P, M) replica holds (an even split)."""
    return math.ceil(spec.total_bytes / (parallel[0] * parallel[1]))
