"""Stalled replicas (a function of `FleetState`): a ready replica that holds unfinished requests
and has been heard from neither by a commit nor by an answer to an operation for
`FleetConfig.stall_timeout_s` is broken. Its workers are fenced (restarted) and its requests
resume elsewhere, so a replica whose engine or actor thread hangs never holds requests for good.

"Heard from" is any commit it sends and any answer (not a failure) to an operation it takes part
in; a replica with an operation under way is not judged (the operation has its own deadline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elastic_llm.control import events as ev
from elastic_llm.control.fleet import ReplicaRecord, ReplicaState

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def heard_from(fleet: FleetState, event: ev.Event) -> None:
    """(Before `event` is handled) the replica it comes from shows signs of life."""
    if isinstance(event, ev.TokensCommitted):
        replica_id: str | None = event.commit.replica
    elif isinstance(event, ev.OperationFailed) or not hasattr(event, "op"):
        return
    else:
        operation = fleet.ops.get(event.op)
        replica_id = operation.replica_id if operation is not None else None
    replica = fleet.replicas.get(replica_id or "")
    if replica is not None:
        replica.heard_at = fleet.now


def _judged(fleet: FleetState, replica: ReplicaRecord) -> bool:
    return (replica.state is ReplicaState.READY and replica.busy is None
            and fleet.table.count_unfinished(replica.replica_id) > 0)


def check_stalls(fleet: FleetState) -> None:
    """Break every ready replica silent for longer than the stall timeout with work on it."""
    limit = fleet.config.stall_timeout_s
    if not limit:
        return
    for replica in list(fleet.replicas.values()):
        if (fleet.now - replica.heard_at >= limit and _judged(fleet, replica)
                and not fleet.ops.involving(replica.replica_id)):
            fleet.break_replica(replica, f"stalled: nothing heard from it for {fleet.now - replica.heard_at:.0f} s "
                                         f"with {fleet.table.count_unfinished(replica.replica_id)} requests on it")


def next_check(fleet: FleetState) -> list[float]:
    """When the next replica may be judged stalled (empty: none has work, or the check is off)."""
    limit = fleet.config.stall_timeout_s
    if not limit:
        return []
    due = [r.heard_at + limit for r in fleet.replicas.values() if _judged(fleet, r)]
    return [min(due)] if due else []
