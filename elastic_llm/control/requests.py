"""The controller's request table: the source of truth for every request's committed tokens.

Replicas commit tokens with the index of the first one (`start`), so a commit that repeats tokens
already known (a resumed request re-sends its whole output) or arrives out of order after a
migration merges idempotently: only tokens beyond the committed length are appended, and a commit
that would leave a gap is refused. A request finishes exactly once; later finishes are ignored.

Clients follow their requests through an event log with a cursor (long-polled by
`ServingClient`). Pure data structure: no dask, no clock (times are parameters).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    kind: str  #: "tokens" | "finished" | "failed"
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


class RequestTable:
    """Every request the controller has accepted, with per-client event logs."""

    def __init__(self, max_events_per_client: int = 100_000) -> None:
        self._records: dict[str, RequestRecord] = {}
        self._events: dict[str, list[ClientEvent]] = {}
        self._next_seq: dict[str, int] = {}
        self._max_events = max_events_per_client

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, request_id: str) -> RequestRecord:
        """The record of `request_id` (KeyError if unknown)."""
        return self._records[request_id]

    def records(self) -> Iterable[RequestRecord]:
        """All records."""
        return self._records.values()

    def add(self, record: RequestRecord) -> None:
        """Accept a new request."""
        if record.request_id in self._records:
            raise ValueError(f"request id {record.request_id!r} is already in use")
        self._records[record.request_id] = record
        self._events.setdefault(record.client, [])

    def unfinished(self, replica: str | None = None) -> list[RequestRecord]:
        """Requests not finished or failed (on `replica`, if given)."""
        return [r for r in self._records.values()
                if r.status in (RequestStatus.QUEUED, RequestStatus.RUNNING)
                and (replica is None or r.replica == replica)]

    def queued(self) -> list[RequestRecord]:
        """Requests waiting for a replica, oldest first."""
        waiting = [r for r in self._records.values() if r.status is RequestStatus.QUEUED]
        return sorted(waiting, key=lambda r: r.arrival)

    def assign(self, request_id: str, replica: str) -> None:
        """The request now runs on `replica`."""
        record = self._records[request_id]
        record.replica, record.status = replica, RequestStatus.RUNNING

    def requeue(self, request_id: str, lost_kv: bool) -> None:
        """The request's replica is gone or paused: queue it again (from its committed tokens)."""
        record = self._records[request_id]
        if record.status is not RequestStatus.RUNNING:
            return
        record.status, record.replica = RequestStatus.QUEUED, None
        record.restarts += 1
        if lost_kv:
            record.tokens_recomputed += len(record.committed)

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
        self._emit(record.client, ClientEvent(0, request_id, "tokens", known, tuple(fresh)))
        return True

    def finish(self, request_id: str, reason: str, text: str, now: float) -> bool:
        """Mark a request finished; False if it already was (exactly once)."""
        record = self._records.get(request_id)
        if record is None or record.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
            return False
        record.status, record.finish_reason, record.text = RequestStatus.FINISHED, reason, text
        record.finish_time = now
        self._emit(record.client, ClientEvent(0, request_id, "finished", finish_reason=reason, text=text))
        return True

    def fail(self, request_id: str, error: str, now: float) -> bool:
        """Mark a request failed with a message; False if it had already ended."""
        record = self._records.get(request_id)
        if record is None or record.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
            return False
        record.status, record.error, record.finish_time = RequestStatus.FAILED, error, now
        self._emit(record.client, ClientEvent(0, request_id, "failed", error=error))
        return True

    def events_since(self, client: str, cursor: int) -> list[ClientEvent]:
        """The client's events with `seq >= cursor`."""
        events = self._events.get(client, [])
        first = events[0].seq if events else 0
        return events[max(0, cursor - first):]

    def forget_client(self, client: str) -> list[str]:
        """Drop a client's event log; returns its unfinished request ids."""
        self._events.pop(client, None)
        return [r.request_id for r in self.unfinished() if r.client == client]

    def _emit(self, client: str, event: ClientEvent) -> None:
        if client not in self._events:
            return
        seq = self._next_seq.get(client, 0)
        self._next_seq[client] = seq + 1
        log = self._events[client]
        log.append(ClientEvent(seq, event.request_id, event.kind, event.start, event.token_ids,
                               event.finish_reason, event.text, event.error))
        if len(log) > self._max_events:
            del log[: len(log) - self._max_events]
