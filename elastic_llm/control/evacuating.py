"""The state machine's transitions for a noticed replica's evacuation (functions of `FleetState`).

A noticed replica decodes until its evacuation's `start_at` (the policy's plan), then its requests
move with their KV to the other ready replicas (`MigrateRequests`, the target owning them before
the pull), or restart elsewhere, or go to a successor (`sharded.hand_over`); the notice is
recorded once every transfer has answered (or failed), and a dissolved replica is then retired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elastic_llm.control import instructions as ins
from elastic_llm.control import sharded
from elastic_llm.control.evacuation import Evacuation, running_requests, split_evenly
from elastic_llm.control.fleet import NoticeRecord, ReplicaRecord, ReplicaState
from elastic_llm.control.operations import Operation
from elastic_llm.planning.arrangement import MigrationTimeModel

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def evacuation_for(fleet: FleetState, replica: ReplicaRecord, deadline: float, received: float,
                   worker: str, then_stop: bool = False) -> Evacuation:
    """When and how `replica`'s requests leave it (the policy's evacuation plan)."""
    requests = running_requests(fleet.table.unfinished(replica.replica_id), replica.kv_bytes_per_token,
                                fleet.config.prefill_seconds_per_token)
    migration = MigrationTimeModel(fleet.config.migration_margin_s, fleet.config.kv_bandwidth)
    step = fleet.loops.step_seconds(replica.replica_id, fleet.config.default_step_seconds)
    plan = fleet.policy.plan_evacuation(received, deadline, requests, step, migration)
    return Evacuation(replica.replica_id, worker, deadline, received, plan.start_at, plan, then_stop)


def evacuate(fleet: FleetState, replica: ReplicaRecord, deadline: float, received: float, worker: str,
             then_stop: bool = False) -> None:
    """`replica` decodes until the plan's start, then its requests leave (`move_out`)."""
    replica.state = ReplicaState.DRAINING
    fleet.evacuations.append(evacuation_for(fleet, replica, deadline, received, worker, then_stop))


def move_out(fleet: FleetState, evacuation: Evacuation) -> None:
    """An evacuation's time has come: move its requests with KV to the other ready replicas,
    or restart them elsewhere; hand over to a successor when there is one."""
    source = fleet.replicas.get(evacuation.replica_id)
    if source is None:
        record_notice(fleet, evacuation)
        return
    if evacuation.successor is not None:
        sharded.hand_over(fleet, source, evacuation)
        return
    plan = evacuation.plan
    targets = [r for r in fleet.replicas.values() if r.state is ReplicaState.READY and r is not source]
    records = fleet.table.unfinished(source.replica_id)
    evacuation.recomputed = len(plan.recompute)
    if not plan.migrate or not targets:
        for record in records:
            fleet.requeue(record, source.replica_id, lost_kv=True, restart=not fleet.policy.resumes_progress)
    else:
        for record in records:
            if record.request_id in plan.recompute:
                fleet.requeue(record, source.replica_id, lost_kv=True)
        keep = [r.request_id for r in records if r.request_id not in plan.recompute]
        for target, ids in zip(targets, split_evenly(keep, len(targets)), strict=False):
            if ids:
                migrate(fleet, source, target, ids, evacuation)
    if not evacuation.open_ops:
        evacuation_done(fleet, evacuation)


def migrate(fleet: FleetState, source: ReplicaRecord, target: ReplicaRecord, ids: list[str],
            evacuation: Evacuation) -> None:
    """`target` pulls `ids` with their KV from `source`. The table names the target as owner
    *before* the pull: its first commit (the whole output so far) must not be refused."""
    for request_id in ids:
        fleet.table.assign(request_id, target.replica_id)
    operation = fleet.ops.open("migrate", target.replica_id, evacuation.deadline + fleet.config.transfer_slack_s,
                              source=source.replica_id, request_ids=tuple(ids),
                              context={"evacuation": evacuation})
    evacuation.open_ops.add(operation.op)
    fleet.emit(ins.MigrateRequests(operation.op, source.replica_id, target.replica_id, tuple(ids),
                                   operation.deadline, evacuation.deadline))


def transfer_finished(fleet: FleetState, operation: Operation, moved: int) -> None:
    evacuation: Evacuation = operation.context["evacuation"]
    evacuation.moved += moved
    evacuation.open_ops.discard(operation.op)
    if not evacuation.open_ops:
        evacuation_done(fleet, evacuation)


def evacuation_done(fleet: FleetState, evacuation: Evacuation) -> None:
    record_notice(fleet, evacuation)
    source = fleet.replicas.get(evacuation.replica_id)
    if evacuation.then_stop and source is not None:
        sharded.retire(fleet, source)


def record_notice(fleet: FleetState, evacuation: Evacuation) -> None:
    fleet.notices.append(NoticeRecord(evacuation.worker, evacuation.deadline, evacuation.received,
                                     evacuation.moved, evacuation.recomputed))
