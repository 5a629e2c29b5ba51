"""The state machine's transitions for sharded replicas (P x M shards over several workers).

Functions of `FleetState` (called from its event handlers, nowhere else): placing replicas of the
shape the planning core chooses, growing or shrinking a replica in place, and what a notice does
to a replica whose shard worker or leader is leaving. Policies decide through the `FleetPolicy`:

- **placement**: D replicas of the chosen (P, M), each on P*M free workers; under
  ``weights_from_peers`` (SpotServe) a new one takes its weight slices from a ready sharded
  replica's shards (`StartReplica.weights_from`), the checkpoint only for what they lack;
- **growth** (adaptive shapes, parallel="auto"): a ready replica of another shape than the one the
  optimizer now chooses is switched to it at a token boundary, KV kept (`Reshard`);
- **a shard worker's notice**: ``reshard`` to the optimizer's shape for the remaining workers plus
  free ones (fixed shapes: the most positions they hold), the leaving worker handing over its
  slices and KV first; if no shape fits there, or under ``dissolve``, the replica is evacuated
  and stopped;
- **the leader's notice**: ``replace``: a successor is created on the other shard workers plus
  free ones (without an engine), the old replica hands it every request WITH its KV and stops,
  and the successor builds and resumes them; ``evacuate``: the requests leave for other replicas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elastic_llm.control import evacuating
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.evacuation import Evacuation
from elastic_llm.control.fleet import NoticeRecord, ReplicaRecord, ReplicaState
from elastic_llm.control.messages import MovedRequest
from elastic_llm.control.operations import Operation

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def place(fleet: FleetState) -> None:
    """Reshape replicas toward the optimizer's choice (adaptive), then place new replicas on
    free workers, P*M at a time."""
    if not fleet.config.sharded:
        return
    if fleet.shapes.needs_spec:
        _describe(fleet)
        return
    shape = fleet.shapes.shape_for(len(fleet.usable_workers()), fleet.memory_budget(), fleet.arrival_rate())
    if shape is None:
        return
    if fleet.policy.adapts_shape and fleet.config.auto_parallel:
        _grow(fleet, shape)
    size = shape[0] * shape[1]
    while len(free := fleet.free_workers()) >= size:
        fleet.new_replica(free[0], tuple(free[:size]), shape, _weights_from(fleet))


def _weights_from(fleet: FleetState) -> str | None:
    """The ready sharded replica a new one takes its weight slices from (policy permitting)."""
    return fleet.weight_peer(sharded=True) if fleet.policy.weights_from_peers else None


def _describe(fleet: FleetState) -> None:
    if not fleet.ops.of_kind("describe"):
        operation = fleet.open_op("describe", None, fleet.config.start_timeout_s)
        fleet.emit(ins.DescribeModel(operation.op, operation.deadline))


def _grow(fleet: FleetState, shape: tuple[int, int]) -> None:
    """Switch ready replicas of another shape to `shape` where their workers plus free ones hold
    it (one that grows keeps its KV; one that shrinks frees workers)."""
    size = shape[0] * shape[1]
    for replica in [r for r in fleet.replicas.values() if r.state is ReplicaState.READY and r.sharded]:
        if (replica.parallel == shape or replica.busy is not None or not fleet.usable(replica.leader)
                or fleet.sends_weights(replica.replica_id)):  # switched once that start is done
            continue
        own = [w for w in replica.shards if fleet.usable(w)]
        pool = own + [w for w in fleet.free_workers() if w not in own]
        if len(pool) >= size:
            _reshard(fleet, replica, shape, _with_leader(replica.leader, pool[:size]))


def _reshard(fleet: FleetState, replica: ReplicaRecord, shape: tuple[int, int], workers: list[str],
             notice: tuple[str, float, float] | None = None) -> None:
    """Switch `replica` to `shape` on `workers` (`notice`: the (worker, deadline, received) it answers)."""
    replica.state = ReplicaState.SWITCHING
    replica.reserved = tuple(w for w in workers if w not in replica.workers)
    operation = fleet.open_op("reshard", replica.replica_id, fleet.config.reshard_timeout_s,
                              context={"workers": tuple(workers), "notice": notice,
                                       "moved": fleet.table.count_unfinished(replica.replica_id)})
    replica.busy = operation.op
    fleet.emit(ins.Reshard(operation.op, replica.replica_id, shape, tuple(workers), fleet.policy.use_mapper,
                           fleet.policy.progressive, operation.deadline))


def reshard_done(fleet: FleetState, event: ev.ReshardDone) -> None:
    """A reshard finished: the replica has its new shape and workers."""
    operation = fleet.ops.close(event.op)
    if operation is None or operation.replica_id not in fleet.replicas:
        return
    replica, summary = fleet.replicas[operation.replica_id], event.summary
    replica.parallel, replica.shards, replica.epoch = summary.new, summary.shards, summary.epoch
    replica.busy, replica.reserved = None, ()
    fleet.kv_bytes_migrated += summary.kv_bytes
    fleet.reshards.append({"replica": replica.replica_id, "old": list(summary.old) if summary.old else None,
                           "new": list(summary.new), "shards": list(summary.shards),
                           "kv_bytes": summary.kv_bytes, "weight_bytes": summary.weight_bytes,
                           "checkpoint_bytes": summary.checkpoint_bytes, "seconds": summary.seconds,
                           "peak_bytes": dict(summary.peak_bytes), "memory_bytes": dict(summary.memory_bytes),
                           "progressive": summary.progressive, "use_mapper": summary.use_mapper,
                           "stage_ready": [[s.stage, s.after, s.seconds, s.later_transfers]
                                           for s in summary.stage_ready]})
    if replica.state is ReplicaState.SWITCHING:
        replica.state = ReplicaState.READY
    notice = operation.context["notice"]
    if notice is not None:
        fleet.notices.append(NoticeRecord(notice[0], notice[1], notice[2], operation.context["moved"], 0))
    _notices_deferred(fleet, replica)
    place(fleet)  # workers the new shape left free may form a replica


def reshard_failed(fleet: FleetState, operation: Operation, why: str) -> None:
    """A reshard failed: the replica cannot go on (its requests recompute elsewhere)."""
    notice = operation.context["notice"]
    if notice is not None:
        fleet.notices.append(NoticeRecord(notice[0], notice[1], notice[2], 0, operation.context["moved"]))
    replica = fleet.replicas.get(operation.replica_id or "")
    if replica is not None:
        fleet.break_replica(replica, why)


def _notices_deferred(fleet: FleetState, replica: ReplicaRecord) -> None:
    """Notices that arrived while the replica switched, handled now."""
    deferred, replica.deferred_notices = replica.deferred_notices, []
    for worker, deadline in deferred:
        if worker == replica.leader:
            _leader_notice_now(fleet, replica, deadline)
        elif worker in replica.shards and not replica.noticed:
            shard_noticed(fleet, replica, worker, deadline)


def shard_noticed(fleet: FleetState, replica: ReplicaRecord, leaving: str, deadline: float) -> None:
    """A non-leader shard worker of `replica` got a notice."""
    if replica.busy is not None:
        replica.deferred_notices.append((leaving, deadline))
        return
    if fleet.policy.shard_notice == "dissolve":
        evacuating.evacuate(fleet, replica, deadline, fleet.now, leaving, then_stop=True)
        return
    workers = [w for w in replica.shards if w != leaving and fleet.usable(w)]
    spares = [w for w in fleet.free_workers() if w not in workers]
    shape = (fleet.shapes.shape_after_loss(replica.parallel, len(workers) + len(spares), fleet.memory_budget(),
                                           fleet.arrival_rate()) if workers else None)
    if shape is None:  # no shape fits there: its requests move to other replicas
        evacuating.evacuate(fleet, replica, deadline, fleet.now, leaving, then_stop=True)
        return
    chosen = _with_leader(replica.leader, (workers + spares)[: shape[0] * shape[1]])
    _reshard(fleet, replica, shape, chosen, notice=(leaving, deadline, fleet.now))


def worker_noticed(fleet: FleetState, address: str, deadline: float) -> None:
    """`address` got a notice (it is marked leaving already): what it does to each replica on it."""
    for replica in list(fleet.replicas.values()):
        if replica.state in (ReplicaState.LOST, ReplicaState.STOPPING) or replica.noticed:
            continue
        if replica.successor_of is not None and address in replica.workers:
            successor_noticed(fleet, replica)
        elif replica.leader == address:
            leader_noticed(fleet, replica, deadline)
        elif address in replica.shards:
            shard_noticed(fleet, replica, address, deadline)


def successor_noticed(fleet: FleetState, successor: ReplicaRecord) -> None:
    """A worker of a successor that has not built yet got a notice (an instance's other workers
    are noticed one by one after its leader): the successor cannot stand. Before the hand-over
    it is dropped and its source's notice planned again, without the leaving workers (so no
    chain of successors forms on workers the source still holds); once the hand-over is under
    way it is lost, and the requests it was given resume elsewhere."""
    source = fleet.replicas.get(successor.successor_of or "")
    evacuation = next((e for e in fleet.evacuations if e.successor == successor.replica_id), None)
    start = next((o for o in fleet.ops.involving(successor.replica_id) if o.kind == "start"), None)
    why = "a worker of the successor got a notice"
    if source is None or (evacuation is None and start is None):  # handing over, or its source is gone
        fleet.lose(successor, why)
        return
    if evacuation is not None:
        fleet.evacuations.remove(evacuation)
        deadline, received = evacuation.deadline, evacuation.received
    else:
        assert start is not None
        fleet.ops.close(start.op)  # dropped, not failed: it is no start failure
        deadline, received = start.context["deadline"], start.context["received"]
    fleet.lose(successor, why)
    _leader_notice_now(fleet, source, deadline, received)


def leader_noticed(fleet: FleetState, replica: ReplicaRecord, deadline: float) -> None:
    """The leader of `replica` (whole-model or sharded) got a notice."""
    replica.noticed = True
    if replica.busy is not None:  # after the switch under way
        replica.deferred_notices.append((replica.leader, deadline))
        return
    _leader_notice_now(fleet, replica, deadline)


def _leader_notice_now(fleet: FleetState, replica: ReplicaRecord, deadline: float,
                       received: float | None = None) -> None:
    replica.state = ReplicaState.DRAINING
    received = fleet.now if received is None else received
    if not replica.sharded or fleet.policy.leader_notice == "evacuate":
        evacuating.evacuate(fleet, replica, deadline, received, replica.leader)
        return
    pool = [w for w in replica.shards if w != replica.leader and fleet.usable(w)]
    pool += [w for w in fleet.free_workers() if w not in pool]
    shape = (fleet.shapes.shape_after_loss(replica.parallel, len(pool), fleet.memory_budget(), fleet.arrival_rate(),
                                           favour_current=False) if pool else None)
    if shape is None:
        evacuating.evacuate(fleet, replica, deadline, received, replica.leader)
        return
    chosen = tuple(pool[: shape[0] * shape[1]])
    # another live replica may send the weights (this one is DRAINING: stopped before the build)
    successor = fleet.new_replica(chosen[0], chosen, shape, _weights_from(fleet), build=False,
                                  successor_of=replica.replica_id, deadline=deadline, received=received)
    successor.successor_of = replica.replica_id


def hand_over(fleet: FleetState, source: ReplicaRecord, evacuation: Evacuation) -> None:
    """The evacuation's time has come: `source` pushes every request WITH its KV to the successor.
    The successor owns them before the push (its first commit must not be refused)."""
    successor = fleet.replicas.get(evacuation.successor or "")
    if successor is None:  # the successor is gone: the requests go to other replicas now
        evacuation.successor = None
        evacuation.start_at = fleet.now
        fleet.evacuations.append(evacuation)
        return
    ids = tuple(r.request_id for r in fleet.table.unfinished(source.replica_id))
    for request_id in ids:
        fleet.table.assign(request_id, successor.replica_id)
    operation = fleet.open_op("handover", successor.replica_id,
                              max(0.0, evacuation.deadline - fleet.now) + fleet.config.transfer_slack_s,
                              source=source.replica_id, request_ids=ids, context={"evacuation": evacuation})
    fleet.emit(ins.HandOver(operation.op, source.replica_id, successor.replica_id, ids, operation.deadline))


def handover_finished(fleet: FleetState, operation: Operation, moved: tuple[MovedRequest, ...]) -> None:
    """The hand-over ended (or failed: nothing `moved`): the requests that did not arrive
    recompute, the old replica stops, and once its workers are free the successor builds."""
    evacuation: Evacuation = operation.context["evacuation"]
    taken = {m.request_id for m in moved}
    fleet.requeue_owned(operation.replica_id, [i for i in operation.request_ids if i not in taken])
    evacuation.moved = len(taken)
    evacuating.record_notice(fleet, evacuation)
    source = fleet.replicas.get(operation.source or "")
    successor = fleet.replicas.get(operation.replica_id or "")
    move = None
    if successor is not None:
        old = source.parallel if source is not None else successor.parallel
        move = {"from_replica": operation.source, "old": list(old), "new": list(successor.parallel),
                "shards": list(successor.shards), "kv_bytes": sum(m.kv_bytes for m in moved),
                "leader_moved": True}
    if source is not None:
        retire(fleet, source, successor.replica_id if successor is not None else None, move)
    elif successor is not None:  # the old replica is gone already: build at once
        build_successor(fleet, successor, operation.source or "", move)


def retire(fleet: FleetState, replica: ReplicaRecord, successor: str | None = None,
           move: dict[str, Any] | None = None) -> None:
    """Stop `replica`; its workers stay held until the stop is confirmed, then free workers
    are placed (or `successor`, which takes them over, builds its engine: `move` describes
    the hand-over for the reshard log)."""
    replica.state = ReplicaState.STOPPING
    operation = fleet.open_op("retire", replica.replica_id, fleet.config.stop_timeout_s,
                             context={"successor": successor, "move": move})
    fleet.emit(ins.RetireReplica(operation.op, replica.replica_id, operation.deadline))


def retired(fleet: FleetState, operation: Operation, why: str | None = None) -> None:
    replica = fleet.replicas.pop(operation.replica_id or "", None)
    if replica is not None:
        fleet.affinity.forget(replica.replica_id)
        if why is not None:  # its shards may linger: nothing new goes to its workers
            fleet.suspect(replica.workers)
            fleet.emit(ins.StopReplica(replica.replica_id))
    successor = fleet.replicas.get(operation.context["successor"] or "")
    if successor is None:
        place(fleet)
    else:
        build_successor(fleet, successor, operation.replica_id or "", operation.context["move"])


def build_successor(fleet: FleetState, successor: ReplicaRecord, source: str,
                    move: dict[str, Any] | None) -> None:
    """The successor of `source` (which is gone) builds its engine."""
    successor.successor_of = None  # its own replica from now on: a notice is a leader's or a shard's
    build = fleet.open_op("build", successor.replica_id, fleet.config.start_timeout_s,
                         context={"handover_of": source, "move": move})
    fleet.emit(ins.BuildReplica(build.op, successor.replica_id, build.deadline))


def _with_leader(leader: str, workers: list[str]) -> list[str]:
    """`workers` with the leader among them (it drives the shards, so it stays)."""
    return list(workers) if leader in workers else [leader, *workers[:-1]]
