"""The scheduler contract shared by every policy (FCFS, skip-join MLFQ) and every executor.

A scheduler is a pure state machine: the executor (the live engine or the simulator) tells it that
requests arrived or left, asks it for the next iteration's batch, and reports what the iteration
did. It never reads a clock: every call carries `now` (seconds, any monotonic origin).

Token accounting follows "tokens computed catch up to tokens wanted": a request enters with the
number of tokens whose KV must be computed before it can sample (its prompt, or prompt + committed
tokens when it resumes by recompute); once that reaches zero it needs one token per iteration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BatchLimits:
    """Capacity of one iteration."""

    max_batch_size: int = 32  #: requests in one iteration
    max_batch_tokens: int = 2048  #: tokens computed in one iteration (prefill chunks + decodes)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1")


@dataclass(frozen=True)
class ScheduledWork:
    """One request's share of an iteration."""

    request_id: str  #: the request
    num_tokens: int  #: tokens whose KV this iteration computes (a prefill chunk, or 1 to decode)


@dataclass(frozen=True)
class SchedulerOutput:
    """The scheduler's decision for one iteration."""

    scheduled: tuple[ScheduledWork, ...] = ()  #: requests to run, in batch order
    preempted: tuple[str, ...] = ()  #: requests that ran last iteration and are paused now
    # KV residency (filled by `scheduling.residency.attach_residency`; empty under plain FCFS).
    # Carry out in this order: swap_out and drop, then swap_in, then prefetch.
    swap_out: tuple[str, ...] = ()  #: move these requests' KV device -> host, latest-needed first
    drop: tuple[str, ...] = ()  #: discard these requests' KV; they recompute it when next scheduled
    swap_in: tuple[str, ...] = ()  #: host -> device, needed by this batch: finish before it runs
    prefetch: tuple[str, ...] = ()  #: host -> device ahead of their turn, soonest first (async)

    @classmethod
    def empty(cls) -> SchedulerOutput:
        """An iteration with nothing to do."""
        return cls()

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this iteration."""
        return sum(work.num_tokens for work in self.scheduled)


@dataclass(frozen=True)
class IterationOutcome:
    """What an executed iteration did, reported back to the scheduler."""

    now: float  #: time the iteration ended (seconds)
    duration: float  #: seconds the iteration took
    computed: Mapping[str, int] = field(default_factory=dict)  #: request -> tokens computed
    sampled: tuple[str, ...] = ()  #: requests that produced a new token this iteration


class RequestScheduler(ABC):
    """Interface of a token-level request scheduler."""

    @abstractmethod
    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        """A request arrived (or resumed) needing `num_tokens_to_compute` tokens of prefill."""

    def note_prompt(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        """The prompt of a request about to be added (executors call this just before
        `add_request`, also on a resume). Policies that predict output lengths from the prompt
        ("las-predicted") use it; every other policy ignores it."""

    @abstractmethod
    def remove_request(self, request_id: str) -> None:
        """A request finished, was aborted or exported; forget it. Unknown ids are ignored."""

    @abstractmethod
    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        """Choose the next iteration's batch."""

    @abstractmethod
    def update(self, outcome: IterationOutcome) -> None:
        """Learn what the last scheduled iteration computed and how long it took."""

    @abstractmethod
    def skip_cached(self, request_id: str, num_tokens: int) -> None:
        """The KV of the request's next `num_tokens` prefill tokens came from a cache, computing
        nothing: it has that many fewer to compute (at least one, which samples, remains). Not an
        iteration: nothing ran and no service is charged. Unknown ids are ignored."""

    @abstractmethod
    def __contains__(self, request_id: object) -> bool:
        """Whether the scheduler holds `request_id`."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of requests held (waiting or running)."""


class DelegatingScheduler(RequestScheduler):
    """Passes every call to `inner` (instrumentation overrides what it watches, calling up)."""

    def __init__(self, inner: RequestScheduler) -> None:
        self.inner = inner

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        self.inner.add_request(request_id, num_tokens_to_compute, now)

    def note_prompt(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        self.inner.note_prompt(request_id, prompt_token_ids)

    def remove_request(self, request_id: str) -> None:
        self.inner.remove_request(request_id)

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        return self.inner.schedule(now, limits)

    def update(self, outcome: IterationOutcome) -> None:
        self.inner.update(outcome)

    def skip_cached(self, request_id: str, num_tokens: int) -> None:
        self.inner.skip_cached(request_id, num_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.inner

    def __len__(self) -> int:
        return len(self.inner)


class PendingEntry(Protocol):
    """A scheduler's record of one request: the tokens it still computes before it samples."""

    pending: int


class PendingTokensScheduler(RequestScheduler):
    """A scheduler whose requests live in `_entries` (request id -> a `PendingEntry`): the
    lookups and the prefix-cache skip every policy shares."""

    _entries: Mapping[str, PendingEntry]

    def skip_cached(self, request_id: str, num_tokens: int) -> None:
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.pending = max(1, entry.pending - num_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
