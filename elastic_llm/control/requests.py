"""The controller's request table: the source of truth for every request's committed tokens.

Replicas commit tokens with the index of the first one (`start`), so a commit that repeats tokens
already known (a resumed request re-sends its whole output) or arrives out of order after a
migration merges idempotently: only tokens beyond the committed length are appended, and a commit
that would leave a gap is refused. A request finishes exactly once; later finishes are ignored.

Clients follow their requests through an event log with a cursor (long-polled by
`ServingClient`). Memory is bounded: finished requests beyond the latest `max_finished` are
pruned into running totals, and each client's log keeps its newest events only (a client that
falls further behind gets `EventsLostError`). Pure data structure: no dask, no clock (times are
parameters).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from elastic_llm.errors import ElasticLLMError
from elastic_llm.sampling import SamplingParams


class RequestStatus(str, enum.Enum):
    """Where a request is in its life."""

    QUEUED = "queued"  #: waiting for a replica
    RUNNING = "running"  #: on a replica
    FINISHED = "finished"  #: done (stop, length or abort)
    FAILED = "failed"  #: refused or failed with an error


@dataclass
class RequestRecord:
    """One request as the controller knows it."""

    request_id: str
    client: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival: float
    committed: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.QUEUED
    replica: str | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    tokens_recomputed: int = 0  #: committed tokens recomputed after losing their KV
    restarts: int = 0  #: times the request lost its replica


@dataclass(frozen=True)
class ClientEvent:
    """One thing a client is told about one of its requests."""

    seq: int  #: position in the client's event log
    request_id: str  #: the request
    kind: str  #: "tokens" | "finished" | "failed" | "lost" (the client's unread events were dropped)
    start: int = 0  #: tokens: index of the first token of `token_ids`
    token_ids: tuple[int, ...] = ()  #: tokens: the new committed tokens
    finish_reason: str | None = None  #: finished: stop | length | abort
    text: str = ""  #: finished: the final text
    error: str = ""  #: failed: the message

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-friendly form."""
        return {"seq": self.seq, "request_id": self.request_id, "kind": self.kind, "start": self.start,
                "token_ids": list(self.token_ids), "finish_reason": self.finish_reason,
                "text": self.text, "error": self.error}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ClientEvent:
        """Inverse of `to_wire`."""
        return cls(data["seq"], data["request_id"], data["kind"], data["start"], tuple(data["token_ids"]),
                   data["finish_reason"], data["text"], data["error"])


class EventsLostError(ElasticLLMError):
    """A client fell so far behind that events it had not read were dropped: its view of its
    requests is incomplete (never silently). `resume_at`: the oldest event still kept."""

    def __init__(self, message: str, resume_at: int) -> None:
        super().__init__(message)
        self.resume_at = resume_at


@dataclass
class RequestTotals:
    """Counters over every request ever accepted (finished ones included after they are pruned)."""

    accepted: int = 0  #: requests accepted
    finished: int = 0  #: requests that finished (stop, length or abort)
    failed: int = 0  #: requests that failed
    tokens_committed: int = 0  #: output tokens committed (less those a restart threw away)
    tokens_finished: int = 0  #: output tokens of finished requests
    tokens_recomputed: int = 0  #: committed tokens recomputed after losing their KV
    restarts: int = 0  #: times a request lost its replica
    requests_restarted: int = 0  #: requests that lost their replica at least once
    latency_sum_s: float = 0.0  #: sum of finished requests' latencies
    ttft_sum_s: float = 0.0  #: sum of finished requests' times to first token
    ttft_count: int = 0  #: finished requests with a first token


class RequestTable:
    """Every request the controller has accepted, with per-client event logs; memory bounded.

    Unfinished requests are all kept. Finished ones are kept for the `max_finished` most recent
    (older ones live on in `totals` and in the latency window only); each client's event log keeps
    its `max_events_per_client` newest events, and a client asking for older ones gets
    `EventsLostError`, never a silent gap. Lookups by replica and of the queue are indexed.
    """

    def __init__(self, max_events_per_client: int = 20_000, max_finished: int = 10_000,
                 latency_window: int = 10_000, arrival_window: int = 100_000) -> None:
        self._records: dict[str, RequestRecord] = {}
        self._by_owner: dict[str | None, dict[str, RequestRecord]] = {None: {}}  # None: queued
        self._finished: deque[str] = deque()
        self._events: dict[str, deque[ClientEvent]] = {}
        self._next_seq: dict[str, int] = {}
        self._max_events = max_events_per_client
        self._max_finished = max_finished
        self.totals = RequestTotals()  #: counters over every request ever accepted
        self.latencies: deque[float] = deque(maxlen=latency_window)  #: latest finished latencies (s)
        self.ttfts: deque[float] = deque(maxlen=latency_window)  #: latest finished times to first token (s)
        self.arrivals: deque[float] = deque(maxlen=arrival_window)  #: latest arrival times

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, request_id: str) -> RequestRecord:
        """The record of `request_id` (KeyError if unknown or pruned)."""
        return self._records[request_id]

    def records(self) -> Iterable[RequestRecord]:
        """The records kept: every unfinished request and the latest finished ones."""
        return self._records.values()

    def add(self, record: RequestRecord) -> None:
        """Accept a new request."""
        if record.request_id in self._records:
            raise ValueError(f"request id {record.request_id!r} is already in use")
        self._records[record.request_id] = record
        self._by_owner[None][record.request_id] = record
        if self._max_events:
            self._events.setdefault(record.client, deque())
        self.totals.accepted += 1
        self.arrivals.append(record.arrival)

    def unfinished(self, replica: str | None = None) -> list[RequestRecord]:
        """Requests not finished or failed (on `replica`, if given)."""
        if replica is not None:
            return list(self._by_owner.get(replica, {}).values())
        return [r for owned in self._by_owner.values() for r in owned.values()]

    def count_unfinished(self, replica: str) -> int:
        """How many unfinished requests `replica` owns."""
        return len(self._by_owner.get(replica, {}))

    def has_queued(self) -> bool:
        """Whether any request waits for a replica (O(1))."""
        return bool(self._by_owner[None])

    def queued(self) -> list[RequestRecord]:
        """Requests waiting for a replica, oldest first."""
        return sorted(self._by_owner[None].values(), key=lambda r: r.arrival)

    def arrived_since(self, since: float) -> int:
        """Requests that arrived at `since` or later (within the arrival window)."""
        return sum(1 for t in reversed(self.arrivals) if t >= since) if self.arrivals else 0

    def assign(self, request_id: str, replica: str) -> None:
        """The request now runs on `replica`."""
        record = self._records[request_id]
        self._move(record, replica)
        record.replica, record.status = replica, RequestStatus.RUNNING

    def requeue(self, request_id: str, lost_kv: bool) -> None:
        """The request's replica is gone or paused: queue it again (from its committed tokens)."""
        record = self._records[request_id]
        if record.status is not RequestStatus.RUNNING:
            return
        self._move(record, None)
        record.status, record.replica = RequestStatus.QUEUED, None
        record.restarts += 1
        self.totals.restarts += 1
        self.totals.requests_restarted += record.restarts == 1
        if lost_kv:
            record.tokens_recomputed += len(record.committed)
            self.totals.tokens_recomputed += len(record.committed)

    def restart(self, request_id: str) -> None:
        """Throw the request's committed tokens away: it starts again from its prompt."""
        record = self._records[request_id]
        self.totals.tokens_committed -= len(record.committed)
        record.committed.clear()

    def commit(self, request_id: str, start: int, token_ids: Sequence[int], now: float) -> bool:
        """Merge committed tokens; False if the commit was refused (unknown, finished, or a gap)."""
        record = self._records.get(request_id)
        if record is None or record.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
            return False
        known = len(record.committed)
        if start > known:
            return False
        fresh = list(token_ids[known - start:])
        if not fresh:
            return True
        if record.first_token_time is None:
            record.first_token_time = now
        record.committed.extend(fresh)
        self.totals.tokens_committed += len(fresh)
        self._emit(record.client, request_id, "tokens", start=known, token_ids=tuple(fresh))
        return True

    def finish(self, request_id: str, reason: str, text: str, now: float) -> bool:
        """Mark a request finished; False if it already was (exactly once)."""
        record = self._records.get(request_id)
        if record is None or record.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
            return False
        record.status, record.finish_reason, record.text = RequestStatus.FINISHED, reason, text
        self._ended(record, now)
        self.totals.finished += 1
        self.totals.tokens_finished += len(record.committed)
        self.totals.latency_sum_s += now - record.arrival
        self.latencies.append(now - record.arrival)
        if record.first_token_time is not None:
            self.totals.ttft_sum_s += record.first_token_time - record.arrival
            self.totals.ttft_count += 1
            self.ttfts.append(record.first_token_time - record.arrival)
        self._emit(record.client, request_id, "finished", finish_reason=reason, text=text)
        return True

    def fail(self, request_id: str, error: str, now: float) -> bool:
        """Mark a request failed with a message; False if it had already ended."""
        record = self._records.get(request_id)
        if record is None or record.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
            return False
        record.status, record.error = RequestStatus.FAILED, error
        self._ended(record, now)
        self.totals.failed += 1
        self._emit(record.client, request_id, "failed", error=error)
        return True

    def events_since(self, client: str, cursor: int) -> list[ClientEvent]:
        """The client's events with `seq >= cursor`; `EventsLostError` if some were dropped.
        Asking from `cursor` acknowledges every earlier event: those are dropped (delivered)."""
        events = self._events.get(client)
        if not events:
            return []
        while events and events[0].seq < cursor:
            events.popleft()
        if not events:
            return []
        first = events[0].seq
        if cursor < first:
            raise EventsLostError(f"client {client} asked for events from {cursor}, but the oldest kept is "
                                  f"{first}: {first - cursor} events were dropped (the log keeps "
                                  f"{self._max_events} per client)", first)
        return list(itertools.islice(events, cursor - first, None))

    def forget_client(self, client: str) -> list[str]:
        """Drop a client's event log; returns its unfinished request ids."""
        self._events.pop(client, None)
        self._next_seq.pop(client, None)
        return [r.request_id for r in self.unfinished() if r.client == client]

    def _unindex(self, record: RequestRecord) -> None:
        """Take `record` out of its owner's index (the queue's when it has no replica)."""
        owned = self._by_owner.get(record.replica)
        if owned is not None:
            owned.pop(record.request_id, None)
            if not owned and record.replica is not None:
                del self._by_owner[record.replica]

    def _move(self, record: RequestRecord, owner: str | None) -> None:
        self._unindex(record)
        self._by_owner.setdefault(owner, {})[record.request_id] = record

    def _ended(self, record: RequestRecord, now: float) -> None:
        record.finish_time = now
        self._unindex(record)
        self._finished.append(record.request_id)
        while len(self._finished) > self._max_finished:
            self._records.pop(self._finished.popleft(), None)

    def _emit(self, client: str, request_id: str, kind: str, **fields: Any) -> None:
        log = self._events.get(client)
        if log is None:  # gone, or no logs kept (max_events_per_client 0: nobody reads them)
            return
        seq = self._next_seq.get(client, 0)
        self._next_seq[client] = seq + 1
        log.append(ClientEvent(seq, request_id, kind, **fields))
        if len(log) > self._max_events:
            log.popleft()
