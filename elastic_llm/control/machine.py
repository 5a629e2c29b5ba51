"""`FleetState`: the fleet's control state machine. Events in, instructions out.

One pure transition, `handle(event, now) -> list[Instruction]` (dask's worker state machine is the model): the Dask
enactor (`elastic_llm.cluster.controller`) turns membership, client handlers, commits and the answers of the actor
calls it made into events and carries the instructions out; the simulator drives the very same class with the cost
model's times. Every decision the controller makes is made here: which replicas exist with which shape on which
workers, which replica gets which request, what a notice or a loss does to each request (migrate with KV, recompute
from the committed tokens, restart), when to pause and move; how much capacity to hold. Where the policies differ, the
policy object decides (`elastic_llm.control.policies`, `.capacity`). Pure: no torch, no dask, no clock, no I/O.

Invariants: the request table's committed tokens are the source of truth; a request is owned by
at most one replica; every open operation has a deadline, and the requests it carried go back to
the queue exactly once when it fails, times out, or loses a replica (`_requeue` checks ownership).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from elastic_llm.control import events as ev
from elastic_llm.control import capacity, dispatch, evacuating, liveness, sharded
from elastic_llm.control import instructions as ins
from elastic_llm.control.clients import ClientPresence
from elastic_llm.control.config import FleetConfig
from elastic_llm.control.evacuation import Evacuation
from elastic_llm.control.fleet import (
    LoopStats,
    NoticeRecord,
    ReplicaRecord,
    ReplicaState,
    WorkerHealth,
    WorkerRecord,
)
from elastic_llm.control.messages import ReplicaCommit
from elastic_llm.control.operations import Operation, Operations
from elastic_llm.control.policies import FleetPolicy, policy_by_name
from elastic_llm.control.requests import RequestRecord, RequestStatus, RequestTable
from elastic_llm.control.shape_choice import ShapeChoice
from elastic_llm.control.shapes import load_changed
from elastic_llm.control.status import fleet_status
from elastic_llm.planning.profiles import InstanceProfile
from elastic_llm.scheduling.affinity import PrefixAffinity

Instructions = list[ins.Instruction]
#: How many notices, reshards and load re-plans the state keeps (the latest).
HISTORY = 1000


class FleetState:
    """Workers, replicas and requests of one served model, and the transition that moves them.

    Args:
        policy: a `FleetPolicy` or its name (`policy_by_name`).
        config: the fleet's settings.
        profile: timings the shape planner plans with (None: a CPU roofline).
    """

    def __init__(self, policy: FleetPolicy | str = "spotserve", config: FleetConfig | None = None,
                 profile: InstanceProfile | None = None) -> None:
        self.policy = policy_by_name(policy)
        self.config = config or FleetConfig()
        self.table = RequestTable(self.config.max_events_per_client, self.config.max_finished_records)  #: requests
        self.workers: dict[str, WorkerRecord] = {}  #: live workers by address
        self.replicas: dict[str, ReplicaRecord] = {}  #: live replicas by id
        self.loops = LoopStats()  #: replicas' loop counters
        self.affinity = PrefixAffinity()  #: prompt prefixes each replica's cache has seen
        self.ops = Operations()  #: instructions awaiting their answer
        self.shapes = ShapeChoice(self.config.parallel, self.config.max_batch_size,
                                  self.policy.adapts_shape, profile, self.config.plan_workload)
        self.notices: deque[NoticeRecord] = deque(maxlen=HISTORY)  #: the latest notices handled
        self.reshards: deque[dict[str, Any]] = deque(maxlen=HISTORY)  #: the latest shape switches
        self.load_replans: deque[dict[str, float]] = deque(maxlen=HISTORY)  #: the latest load re-plans
        self.kv_bytes_migrated = 0  #: KV bytes moved between replicas
        self.weight_bytes_from_peers = 0  #: weight bytes new replicas took from peers
        self.reloads = 0  #: replicas that reloaded their weights from the checkpoint (reparallelize)
        self.commits_refused = 0  #: commits from an unknown replica or not from its leader's worker
        self.evacuations: list[Evacuation] = []  #: noticed replicas still decoding before they move
        self.last_start_seconds = 5.0  #: how long the latest replica took to start
        self.capacity = capacity.CapacityState()  #: instances asked for and given back (capacity-aware policies)
        self._ids = itertools.count()
        self._next_load_check: float | None = None
        self._out: Instructions = []
        self._now = 0.0
        self._touched: set[str] = set()  # clients with new events in this transition
        self.clients = ClientPresence()  #: clients away: disconnected (may reconnect) or gone
        self._start_failures = 0  # replica starts that failed since the last one that did not

    # ------------------------------------------------------------------ the transition
    def handle(self, event: ev.Event, now: float) -> Instructions:
        """Apply one event at time `now`; the instructions to carry out, in order."""
        self._now, self._out = now, []
        handler: Callable[[Any], None] = getattr(self, f"_on_{type(event).__name__}")
        liveness.heard_from(self, event)
        handler(event)
        self._advance()
        if self._touched:
            self.emit(ins.NotifyClients(tuple(sorted(self._touched))))
            self._touched = set()
        out, self._out = self._out, []
        return out

    def status(self, now: float) -> dict[str, Any]:
        """The fleet's figures (`elastic_llm.control.status.fleet_status`)."""
        return fleet_status(self, now)

    # ------------------------------------------------------------------ membership
    def _on_WorkerJoined(self, event: ev.WorkerJoined) -> None:
        self.workers[event.address] = WorkerRecord(event.address, event.market, event.price_per_hour,
                                                   event.memory_bytes, self._now)
        if self.policy.restarts_everything:
            self._restart_everything()
        if self.config.sharded:
            sharded.place(self)
        else:
            self._start_whole(event.address)

    def _on_WorkerLost(self, event: ev.WorkerLost) -> None:
        self.workers.pop(event.address, None)
        for replica in [r for r in self.replicas.values() if event.address in r.workers]:
            if replica.state is ReplicaState.STOPPING:
                continue  # its orderly stop (`RetireReplica`) is under way and frees its workers
            if replica.sharded:  # its other shards keep a broken process group: fence them
                self.suspect([w for w in replica.workers if w != event.address])
            self.lose(replica, f"worker {event.address} is gone")
        for operation in [o for o in self.ops.of_kind("reshard") if event.address in o.context["workers"]]:
            self._fail(operation, f"worker {event.address} is gone")
        if self.policy.restarts_everything:
            self._restart_everything()
        elif self.config.sharded:
            sharded.place(self)

    def _on_WorkerNoticed(self, event: ev.WorkerNoticed) -> None:
        worker = self.workers.get(event.address)
        if worker is None:
            return
        worker.health, worker.deadline = WorkerHealth.LEAVING, event.deadline
        sharded.worker_noticed(self, event.address, event.deadline)

    # ------------------------------------------------------------------ requests
    def _on_RequestSubmitted(self, event: ev.RequestSubmitted) -> None:
        self.clients.submitted(event.client)
        self.table.add(RequestRecord(event.request_id, event.client, tuple(event.prompt_token_ids),
                                     event.params, self._now))

    def _on_RequestsCancelled(self, event: ev.RequestsCancelled) -> None:
        by_replica: dict[str, list[str]] = {}
        for request_id in event.request_ids:
            if request_id not in self.table:
                continue
            record = self.table.get(request_id)
            owner = record.replica
            if self.table.finish(request_id, "abort", "", self._now):
                self._touched.add(record.client)
                if owner is not None:
                    by_replica.setdefault(owner, []).append(request_id)
        for replica_id, ids in by_replica.items():
            if replica_id in self.replicas:
                self.emit(ins.CancelRequests(replica_id, tuple(ids)))

    def _on_ClientGone(self, event: ev.ClientGone) -> None:
        """Its requests run on for `client_reconnect_s`, then are aborted (log kept `client_log_ttl_s`)."""
        self.clients.disconnected(event.client, self._now)

    def _on_ClientBack(self, event: ev.ClientBack) -> None:
        self.clients.back(event.client)

    def _forget_gone_clients(self) -> None:
        for client in self.clients.give_up(self._now, self.config.client_reconnect_s):
            self._on_RequestsCancelled(ev.RequestsCancelled(
                tuple(r.request_id for r in self.table.unfinished() if r.client == client)))
        for client in self.clients.forget(self._now, self.config.client_log_ttl_s):
            self.table.forget_client(client)

    def _on_TokensCommitted(self, event: ev.TokensCommitted) -> None:
        commit: ReplicaCommit = event.commit
        replica = self.replicas.get(commit.replica)
        if replica is None or (event.origin is not None and event.origin != replica.leader):
            self.commits_refused += 1  # an unknown replica, or a stream not from its worker: forged
            return
        self.loops.record(commit.replica, commit.loop)
        touched: set[str] = set()
        for tokens in commit.tokens:
            if self._owned_by(tokens.request_id, commit.replica) and self.table.commit(
                    tokens.request_id, tokens.start, tokens.token_ids, self._now):
                touched.add(tokens.request_id)
        for done in commit.finished:
            # a finish carries the whole output: authoritative from whichever replica ran the
            # request to its end (outputs are deterministic), e.g. one it was just moved from
            if done.request_id not in self.table:
                continue
            self.table.commit(done.request_id, 0, done.token_ids, self._now)
            if self.table.finish(done.request_id, done.reason, done.text, self._now):
                touched.add(done.request_id)
                record = self.table.get(done.request_id)  # its replica now caches prompt and answer
                self.affinity.observe(commit.replica, [*record.prompt_token_ids, *record.committed])
        for failure in commit.failed:
            if self._owned_by(failure.request_id, commit.replica) and self.table.fail(
                    failure.request_id, failure.error, self._now):
                touched.add(failure.request_id)
        self._touched.update(self.table.get(r).client for r in touched)

    def _owned_by(self, request_id: str, replica_id: str) -> bool:
        """Commits count only from the replica the table says runs the request."""
        return request_id in self.table and self.table.get(request_id).replica == replica_id

    def _on_RequestsAssigned(self, event: ev.RequestsAssigned) -> None:
        self.ops.close(event.op)

    def requeue(self, record: RequestRecord, owner: str, lost_kv: bool, restart: bool = False) -> bool:
        """Queue `record` again if `owner` still owns it (exactly once, whoever asks); its old
        replica drops it. Whether it was requeued."""
        if record.status is not RequestStatus.RUNNING or record.replica != owner:
            return False
        self.table.requeue(record.request_id, lost_kv)
        if restart:
            self.table.restart(record.request_id)
        if owner in self.replicas and self.replicas[owner].state is not ReplicaState.LOST:
            self.emit(ins.CancelRequests(owner, (record.request_id,)))
        return True

    def requeue_all(self, replica_id: str, lost_kv: bool, restart: bool = False,
                     only: Sequence[str] | None = None) -> int:
        """Requeue the requests `replica_id` owns (only those in `only`, if given)."""
        records = self.table.unfinished(replica_id)
        if only is not None:
            wanted = set(only)
            records = [r for r in records if r.request_id in wanted]
        return sum(self.requeue(r, replica_id, lost_kv, restart) for r in records)

    # ------------------------------------------------------------------ replicas
    def new_replica(self, leader: str, shards: tuple[str, ...], parallel: tuple[int, int],
                     weights_from: str | None, build: bool = True, **context: Any) -> ReplicaRecord:
        replica = ReplicaRecord(f"r{next(self._ids)}", leader, shards, parallel, created_at=self._now,
                                weights_from=weights_from)
        self.replicas[replica.replica_id] = replica
        operation = self.ops.open("start", replica.replica_id, self._now + self.config.start_timeout_s,
                                  context=context)
        self.emit(ins.StartReplica(operation.op, replica.replica_id, leader, shards, parallel, weights_from,
                                    build, operation.deadline))
        return replica

    def _start_whole(self, worker: str) -> None:
        """A whole-model replica on `worker`, weights from a ready peer where the policy says so."""
        if self.workers[worker].health is not WorkerHealth.UP or self._held(worker):
            return
        peer = self.weight_peer(sharded=False) if self.policy.weights_from_peers else None
        self.new_replica(worker, (), (1, 1), peer)

    def weight_peer(self, sharded: bool) -> str | None:
        """A ready replica (whole-model or `sharded`) that can send its weights: not switching,
        none of its workers about to leave; least loaded first (None: there is none)."""
        ready = [r for r in self.replicas.values() if r.state is ReplicaState.READY and r.sharded == sharded
                 and r.busy is None and all(self.usable(w) for w in r.workers)]
        best = min(ready, key=lambda r: dispatch.outstanding(self, r.replica_id), default=None)
        return None if best is None else best.replica_id

    def sends_weights(self, replica_id: str) -> bool:
        """Whether a starting replica takes its weights from `replica_id`: its shards must keep
        the slices they were described with until then (a reshard would leave the new replica
        pulling slices they no longer hold, read again from the checkpoint)."""
        return any(r.state is ReplicaState.STARTING and r.weights_from == replica_id
                   for r in self.replicas.values())

    def _on_ReplicaReady(self, event: ev.ReplicaReady) -> None:
        operation = self.ops.close(event.op)
        if operation is None or operation.replica_id not in self.replicas:
            return
        replica = self.replicas[operation.replica_id]
        if operation.kind in ("start", "build"):
            self._start_failures = 0
            replica.start_seconds = self.last_start_seconds = self._now - replica.created_at
            replica.kv_bytes_per_token = event.info.kv_bytes_per_token
            replica.weights = event.info.weights
            self.weight_bytes_from_peers += event.info.weight_bytes_from_peer
        elif operation.kind == "reload":
            self.reloads += 1
        if replica.state is ReplicaState.STARTING:
            replica.state = ReplicaState.READY
        source, replica.weights_from = replica.weights_from, None
        if operation.kind == "build" and "handover_of" in operation.context:
            self.reshards.append({**operation.context["move"], "replica": replica.replica_id})
            sharded.place(self)
        elif source is not None and not self.sends_weights(source):
            sharded.place(self)  # a switch of the source that waited for this start

    def _on_ReplicaCreated(self, event: ev.ReplicaCreated) -> None:
        operation = self.ops.close(event.op)
        if operation is None or operation.replica_id not in self.replicas:
            return
        source = self.replicas.get(operation.context.get("successor_of", ""))
        if source is None:  # the replica it was to succeed is gone meanwhile
            self.lose(self.replicas[operation.replica_id], "nothing to succeed")
            return
        evacuation = evacuating.evacuation_for(self, source, operation.context["deadline"], operation.context["received"],
                                          source.leader)
        evacuation.start_at = max(self._now, evacuation.start_at - self.last_start_seconds)
        evacuation.successor = operation.replica_id
        self.evacuations.append(evacuation)

    def _on_ModelDescribed(self, event: ev.ModelDescribed) -> None:
        if self.ops.close(event.op) is not None:
            self.shapes.spec = event.spec
            sharded.place(self)

    def lose(self, replica: ReplicaRecord, why: str) -> None:
        """`replica` cannot go on: its requests resume elsewhere (recompute, or restart under the
        baselines), its operations fail, and it is stopped."""
        replica.state = ReplicaState.LOST
        self.requeue_all(replica.replica_id, lost_kv=True, restart=not self.policy.resumes_progress)
        self.replicas.pop(replica.replica_id, None)
        self.affinity.forget(replica.replica_id)
        self.emit(ins.StopReplica(replica.replica_id))
        for operation in self.ops.involving(replica.replica_id):
            if operation.kind == "migrate" and operation.source == replica.replica_id:
                continue  # the target answers: it may hold them already (its pull is bounded)
            self._fail(operation, why)

    def break_replica(self, replica: ReplicaRecord, why: str) -> None:
        """A replica whose switch or start failed: its workers are suspect, then it is lost."""
        self.suspect(replica.workers)
        self.lose(replica, why)

    def suspect(self, workers: Sequence[str]) -> None:
        """Nothing new goes to `workers`; they are restarted (fenced) unless starts keep failing."""
        fenced = []
        for address in workers:
            if address in self.workers and self.workers[address].health is WorkerHealth.UP:
                self.workers[address].health = WorkerHealth.SUSPECT
                fenced.append(address)
        if fenced and self._start_failures < self.config.max_start_failures:
            self.emit(ins.RestartWorkers(tuple(fenced)))

    def _restart_everything(self) -> None:
        """(reparallelize) every ready replica reloads from the checkpoint, every request restarts."""
        for record in self.table.unfinished():
            if record.replica is not None:
                self.requeue(record, record.replica, lost_kv=True, restart=True)
        for replica in [r for r in self.replicas.values() if r.state is ReplicaState.READY]:
            replica.state = ReplicaState.STARTING
            operation = self.ops.open("reload", replica.replica_id, self._now + self.config.start_timeout_s)
            self.emit(ins.ReloadReplica(operation.op, replica.replica_id, operation.deadline))

    # ------------------------------------------------------------------ failures and time
    def _on_OperationFailed(self, event: ev.OperationFailed) -> None:
        operation = self.ops.close(event.op)
        if operation is not None:
            self._failed(operation, event.error)

    def _fail(self, operation: Operation, why: str) -> None:
        """Fail an open operation (timed out, or a replica it involves is gone)."""
        if self.ops.close(operation.op) is not None:
            self._failed(operation, why)

    def _failed(self, operation: Operation, why: str) -> None:
        replica = self.replicas.get(operation.replica_id or "")
        if operation.kind == "assign":
            if replica is not None:
                self.requeue_all(replica.replica_id, lost_kv=False, only=operation.request_ids)
        elif operation.kind in ("start", "build", "reload"):
            self._start_failed(operation, replica, why)
        elif operation.kind == "migrate":
            self.requeue_owned(operation.replica_id, operation.request_ids)
            evacuating.transfer_finished(self, operation, moved=0)
        elif operation.kind == "handover":
            sharded.handover_finished(self, operation, ())
        elif operation.kind == "reshard":
            sharded.reshard_failed(self, operation, why)
        elif operation.kind == "retire":
            sharded.retired(self, operation, why)

    def requeue_owned(self, owner: str | None, request_ids: Sequence[str]) -> None:
        """Requeue (lost KV) those of `request_ids` that `owner` still owns."""
        for request_id in request_ids:
            if owner is not None and request_id in self.table:
                self.requeue(self.table.get(request_id), owner, lost_kv=True)

    def _start_failed(self, operation: Operation, replica: ReplicaRecord | None, why: str) -> None:
        """A start, build or reload failed. A sharded replica's workers are fenced and the fleet
        is placed again on healthy free workers (so a broken pair is never retried as it is)."""
        successor_of = operation.context.get("successor_of")
        self._start_failures += 1
        if replica is not None:
            if operation.kind == "build" or replica.sharded:
                self.break_replica(replica, why)
            else:
                self.lose(replica, why)
        if replica is not None and replica.sharded and successor_of is None:
            sharded.place(self)
        source = self.replicas.get(successor_of or "")
        if source is not None and operation.kind == "start":  # no successor: move to other replicas
            evacuating.evacuate(self, source, operation.context["deadline"], operation.context["received"], source.leader)

    def _advance(self) -> None:
        """Expired operations fail; due evacuations start; the load is checked; queued requests
        are dispatched; the next timer is asked for."""
        for operation in self.ops.expired(self._now):
            self._fail(operation, "timed out")
        for evacuation in [e for e in self.evacuations if e.start_at <= self._now]:
            self.evacuations.remove(evacuation)
            evacuating.move_out(self, evacuation)
        self._check_load()
        self.capacity.advance(self)
        self._forget_gone_clients()
        liveness.check_stalls(self)
        dispatch.dispatch(self)
        timers = [e.start_at for e in self.evacuations] + liveness.next_check(self)
        timers += self.clients.give_up_times(self.config.client_reconnect_s)
        if self._next_load_check is not None:
            timers.append(self._next_load_check)
        if timers:
            self.emit(ins.WakeAt(min(timers)))

    def _on_Tick(self, event: ev.Tick) -> None:
        pass  # `_advance` does the work of every transition

    # ------------------------------------------------------------------ notices (whole or sharded)
    def _on_TransferDone(self, event: ev.TransferDone) -> None:
        operation = self.ops.close(event.op)
        if operation is None:
            return
        taken = {m.request_id for m in event.moved}
        self.kv_bytes_migrated += sum(m.kv_bytes for m in event.moved)
        if operation.kind == "handover":
            sharded.handover_finished(self, operation, event.moved)
            return
        # finished meanwhile, or never arrived: those the target owns recompute
        self.requeue_owned(operation.replica_id, [i for i in operation.request_ids if i not in taken])
        evacuating.transfer_finished(self, operation, moved=len(taken))

    def _on_ReplicaStopped(self, event: ev.ReplicaStopped) -> None:
        operation = self.ops.close(event.op)
        if operation is not None:
            sharded.retired(self, operation)

    # ------------------------------------------------------------------ helpers
    def emit(self, instruction: ins.Instruction) -> None:
        self._out.append(instruction)

    def usable(self, address: str) -> bool:
        worker = self.workers.get(address)
        return worker is not None and worker.health is WorkerHealth.UP

    def _held(self, address: str) -> bool:
        return any(address in r.workers or address in r.reserved for r in self.replicas.values())

    def free_workers(self) -> list[str]:
        """Usable workers holding nothing, in a stable order (O(workers + replica positions))."""
        held = {w for r in self.replicas.values() for w in (*r.workers, *r.reserved)}
        return sorted(a for a in self.workers if self.usable(a) and a not in held)

    def usable_workers(self) -> list[str]:
        """Workers neither leaving nor suspect (held or free)."""
        return sorted(a for a in self.workers if self.usable(a))

    def memory_budget(self) -> int:
        """Bytes one worker may hold: the configured budget, else the smallest announced one."""
        if self.config.memory_budget_bytes is not None:
            return self.config.memory_budget_bytes
        return min((self.workers[a].memory_bytes for a in self.usable_workers()), default=0)

    def arrival_rate(self) -> float:
        """Requests per second submitted over the last `rate_window_s` (at least `required_rate`)."""
        window = self.config.rate_window_s
        measured = self.table.arrived_since(self._now - window) / window if window else 0.0
        return max(measured, self.config.required_rate)

    def _check_load(self) -> None:
        """(adaptive shapes) plan the fleet again when the arrival rate has moved 2x or more."""
        if not (self.policy.adapts_shape and self.config.auto_parallel):
            return
        if self._next_load_check is None:
            self._next_load_check = self._now + self.config.load_check_s
            return
        if self._now < self._next_load_check:
            return
        self._next_load_check = self._now + self.config.load_check_s
        rate = self.arrival_rate()
        if load_changed(self.shapes.planned_rate, rate):
            self.load_replans.append({"time": self._now, "planned_rate": self.shapes.planned_rate, "rate": rate})
            sharded.place(self)

    def _on_ReshardDone(self, event: ev.ReshardDone) -> None:
        sharded.reshard_done(self, event)

    @property
    def now(self) -> float:
        """The time of the transition under way."""
        return self._now

    def open_op(self, kind: Any, replica_id: str | None, seconds: float, **fields: Any) -> Operation:
        """Open an operation due `seconds` from now."""
        return self.ops.open(kind, replica_id, self._now + seconds, **fields)
