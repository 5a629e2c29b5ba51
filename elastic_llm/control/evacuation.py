"""A noticed replica's evacuation in progress, and the pure helpers that plan it.

`Evacuation` is the state machine's record of one notice being handled: the replica decodes
until `start_at` (the policy's plan: SpotServe's arrangement, or just before the deadline), then
its requests move with their KV (or restart), to the other replicas or to a successor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from elastic_llm.control.policies import EvacuationPlan
from elastic_llm.control.requests import RequestRecord
from elastic_llm.planning.arrangement import RunningRequest


@dataclass
class Evacuation:
    """One noticed replica whose requests are to leave it."""

    replica_id: str  #: the replica
    worker: str  #: the noticed worker
    deadline: float  #: when it disappears
    received: float  #: when the notice arrived
    start_at: float  #: when the requests leave
    plan: EvacuationPlan  #: how they leave
    then_stop: bool = False  #: stop the replica once they left (a dissolved sharded replica)
    successor: str | None = None  #: a replica built to take every request (a noticed leader)
    moved: int = 0  #: requests that moved with their KV so far
    recomputed: int = 0  #: requests sent to recompute
    open_ops: set[int] = field(default_factory=set)  #: its transfers still under way


def running_requests(records: Sequence[RequestRecord], kv_bytes_per_token: int,
                     prefill_seconds_per_token: float) -> list[RunningRequest]:
    """The arrangement's view of a replica's unfinished requests."""
    return [RunningRequest(r.request_id, 0, len(r.prompt_token_ids) + len(r.committed),
                           max(0, r.params.max_new_tokens - len(r.committed)), kv_bytes_per_token,
                           (len(r.prompt_token_ids) + len(r.committed)) * prefill_seconds_per_token)
            for r in records]


def split_evenly(items: Sequence[str], parts: int) -> list[list[str]]:
    """`items` in `parts` contiguous runs whose lengths differ by at most one (the first longer)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        stop = start + size + (index < extra)
        out.append(list(items[start:stop]))
        start = stop
    return out
