"""Dispatch: which ready replica gets each queued request (a function of `FleetState`).

The least loaded replica by outstanding tokens, or one whose prefix cache holds the request's
start when that saves more prefill than it queues (`PrefixAffinity`). Pure policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elastic_llm.control import instructions as ins
from elastic_llm.control.fleet import ReplicaState
from elastic_llm.control.messages import RequestWork

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def dispatch(fleet: FleetState) -> None:
    """Queued requests go to ready replicas: the least loaded by outstanding tokens, or one
    whose prefix cache holds the request's start when that saves more than it queues."""
    if not fleet.table.has_queued():  # the common case (after every commit): nothing to do
        return
    ready = [r.replica_id for r in fleet.replicas.values() if r.state is ReplicaState.READY]
    if not ready:
        return
    queued = fleet.table.queued()
    load = {replica_id: outstanding(fleet, replica_id) for replica_id in ready}
    fleet.affinity.retain(fleet.replicas)
    batches: dict[str, list[RequestWork]] = {}
    for record in queued:
        target = fleet.affinity.choose([*record.prompt_token_ids, *record.committed], load)
        fleet.affinity.observe(target, record.prompt_token_ids)
        load[target] += len(record.prompt_token_ids) + record.params.max_new_tokens
        fleet.table.assign(record.request_id, target)
        batches.setdefault(target, []).append(RequestWork(
            record.request_id, record.prompt_token_ids, tuple(record.committed), record.params))
    for replica_id, work in batches.items():
        ids = tuple(w.request_id for w in work)
        operation = fleet.open_op("assign", replica_id, fleet.config.call_timeout_s, request_ids=ids)
        fleet.emit(ins.AssignRequests(operation.op, replica_id, tuple(work), operation.deadline))


def outstanding(fleet: FleetState, replica_id: str) -> int:
    """Tokens still to process on `replica_id`: prompts plus the new tokens not yet committed."""
    return sum(len(r.prompt_token_ids) + r.params.max_new_tokens - len(r.committed)
               for r in fleet.table.unfinished(replica_id))
