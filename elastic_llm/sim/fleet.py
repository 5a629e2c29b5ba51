"""Discrete-event simulation of a spot fleet driving the live control state machine, unchanged.

`FleetSimulator` is a second enactor of `elastic_llm.control.FleetState` (the Dask one is
`elastic_llm.cluster.enactor`): it turns an availability trace into `WorkerJoined` /
`WorkerNoticed` (one grace period before a removal) / `WorkerLost` events, an arrival trace into
`RequestSubmitted`, and answers every instruction the state machine returns in simulated time:

- replica starts load their weight slices from the checkpoint at object-storage bandwidth, or
  from a ready peer at link bandwidth (`StartReplica.weights_from`), per instance;
- iterations are timed by the planning core's cost model over a measured profile
  (`IterationClock`), static or continuous batching, one `TokensCommitted` per iteration;
- migrations and hand-overs pause the source at its next token boundary and move the requests'
  KV at link bandwidth; reshards move the weight slices the new workers lack (all of them without
  the device mapper) and resume after the first stage's share (progressive) or all of it;
- a reload (reparallelize) drops every request and reads the checkpoint again;
- `AcquireCapacity` brings on-demand instances after `SimSettings.acquire_delay_s`, billed from
  the request; `ReleaseCapacity` takes an instance away once all its workers are released (its
  later trace events are then ignored: a released spot instance went back to the market).

One worker is one GPU; an instance is `gpus_per_instance` workers noticed and lost together.
Pure: no clock, no I/O; time is simulated seconds from the trace start.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from elastic_llm.control import FleetState
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.messages import FinishCommit, LoopCounters, ReplicaCommit, ReplicaInfo, TokenCommit
from elastic_llm.model.spec import ModelSpec
from elastic_llm.sampling import SamplingParams
from elastic_llm.scheduling.factory import make_scheduler
from elastic_llm.sim.moves import MoveTimer, ReshardPlan
from elastic_llm.sim.replica import Iteration, IterationClock, SimReplica, SimRequest, kv_bytes
from elastic_llm.sim.results import SimResult, SimSettings
from elastic_llm.sim.traces import Arrival, AvailabilityTrace


class SimulationLimitError(RuntimeError):
    """The simulation ran past its event bound (`SimSettings.max_events`)."""


class FleetSimulator:
    """Replays traces through a `FleetState`; `run()` once, then read the `SimResult`.

    Args:
        fleet: the control state machine (any policy; built by the caller, never changed here).
        spec: the served model.
        clock: iteration times (the cost model over a measured profile).
        settings: the fleet's behaviour.
    """

    def __init__(self, fleet: FleetState, spec: ModelSpec, clock: IterationClock,
                 settings: SimSettings | None = None) -> None:
        self.fleet = fleet
        self.spec = spec
        self.clock = clock
        self.settings = settings or SimSettings()
        self.moves = MoveTimer(spec, self.settings)
        self.now = 0.0
        self.replicas: dict[str, SimReplica] = {}  #: live simulated replicas by id
        self.alive: dict[str, tuple[str, float]] = {}  #: instance -> (market, since)
        self.held_s = {"spot": 0.0, "on-demand": 0.0}  #: instance-seconds of instances gone
        self.arrived: dict[str, float] = {}  #: request id -> arrival time
        self.finished_at: dict[str, float] = {}  #: request id -> when it finished (first time)
        self.finishes: dict[str, int] = {}  #: request id -> finish commits sent
        self.violations: list[str] = []  #: broken invariants
        self.weight_bytes_moved = 0
        self.checkpoint_bytes = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ticks: set[float] = set()
        self._events = 0
        self._weights_at: dict[str, float] = {}  # replica -> when its weights are in place
        self._instance_sets: dict[tuple[str, ...], frozenset[str]] = {}
        self._released: dict[str, set[str]] = {}  # instance -> its workers released so far
        self.acquired = 0  #: instances acquired on the state machine's request
        self.released = 0  #: instances given back on its request

    # ------------------------------------------------------------------ the loop
    def at(self, time: float, action: Callable[[], None]) -> None:
        """Run `action` at simulated `time` (never before now)."""
        heapq.heappush(self._heap, (max(time, self.now), next(self._seq), action))

    def send(self, event: ev.Event) -> None:
        """Hand `event` to the state machine now and enact what it returns."""
        for instruction in self.fleet.handle(event, self.now):
            self._enact(instruction)

    def run(self, availability: AvailabilityTrace, arrivals: Sequence[Arrival]) -> SimResult:
        """Replay both traces until every request finished (or the drain limit); the figures."""
        self._schedule_availability(availability)
        for index, arrival in enumerate(arrivals):
            params = SamplingParams(max_new_tokens=arrival.output_len or self.settings.output_tokens, ignore_eos=True)
            self.at(arrival.time, self._submit(f"q{index}", arrival, params, index))
        stop_at = max(availability.end, arrivals[-1].time if arrivals else 0.0) + self.settings.drain_limit_s
        while self._heap:
            time, _, action = heapq.heappop(self._heap)
            if time > stop_at:
                break
            self.now = time
            self._events += 1
            if self._events > self.settings.max_events:
                raise SimulationLimitError(f"more than {self.settings.max_events} events by t={time:.1f} s")
            action()
            if arrivals and len(self.finished_at) == len(arrivals) and time >= arrivals[-1].time:
                break
        return self._result(arrivals, min(self.now, stop_at), availability.end)

    def _submit(self, request_id: str, arrival: Arrival, params: SamplingParams, index: int) -> Callable[[], None]:
        def submit() -> None:
            self.arrived[request_id] = self.now
            prompt = tuple(range(index * arrival.input_len, (index + 1) * arrival.input_len))  # no shared prefix
            self.send(ev.RequestSubmitted(request_id, "sim", prompt, params))
        return submit

    # ------------------------------------------------------------------ instances
    def _schedule_availability(self, trace: AvailabilityTrace) -> None:
        added: dict[str, float] = {}
        for event in trace.events:
            if event.kind == "add":
                usable = event.time + (self.settings.start_delay_s if event.time > 0 else 0.0)
                added[event.instance] = usable
                self.at(usable, lambda e=event: self._instance_added(e.instance, e.market))
            else:
                notice = max(added.get(event.instance, 0.0), event.time - self.settings.grace_period_s)
                self.at(notice, lambda e=event: self._instance_noticed(e.instance, e.time))
                self.at(event.time, lambda e=event: self._instance_removed(e.instance))

    def gpus(self, instance: str) -> list[str]:
        """The worker addresses of an instance."""
        return [f"{instance}/g{i}" for i in range(self.settings.gpus_per_instance)]

    def _instance_added(self, instance: str, market: str, billed_from: float | None = None) -> None:
        if instance in self.alive:
            return
        self.alive[instance] = (market, self.now if billed_from is None else billed_from)
        price = self.settings.spot_price if market == "spot" else self.settings.on_demand_price
        for worker in self.gpus(instance):
            self.send(ev.WorkerJoined(worker, market, price / self.settings.gpus_per_instance,
                                      self.settings.gpu_memory_bytes))

    def _instance_noticed(self, instance: str, deadline: float) -> None:
        """All of an instance's workers are noticed at once; the state machine takes one event per
        worker, replica leaders last: a replica then first reshards away from its leaving shards.
        (Either order keeps workers exclusive: a successor whose worker is noticed before it builds
        is dropped and planned again; leader first measured 37.5 / 37.7 s P99 on A_S / B_S against
        37.5 / 39.8 s, see docs/benchmarks.md, "Fleet simulator".)"""
        if instance in self.alive:
            leaders = {r.leader for r in self.replicas.values()}
            for worker in sorted(self.gpus(instance), key=lambda w: w in leaders):
                self.send(ev.WorkerNoticed(worker, deadline))

    def _instance_removed(self, instance: str) -> None:
        if instance not in self.alive:
            return
        market, since = self.alive.pop(instance)
        self.held_s[market] += self.now - since
        workers = set(self.gpus(instance))
        for replica in [r for r in self.replicas.values() if workers & set(r.workers)]:
            self.replicas.pop(replica.replica_id, None)  # its processes die with the instance
        for worker in sorted(workers):
            self.send(ev.WorkerLost(worker))

    def _instances(self, workers: tuple[str, ...]) -> frozenset[str]:
        """The instances a replica's workers are on (cached per worker tuple)."""
        found = self._instance_sets.get(workers)
        if found is None:
            found = self._instance_sets[workers] = frozenset(self.instance_of(w) for w in workers)
        return found

    def instance_of(self, worker: str) -> str:
        """The instance a worker address belongs to."""
        return worker.rsplit("/", 1)[0]

    # ------------------------------------------------------------------ iterations
    def kick(self, replica: SimReplica) -> None:
        """Start the replica's next iteration if it is idle and has work."""
        if replica.iterating or self.replicas.get(replica.replica_id) is not replica:
            return
        iteration = replica.next_iteration(self.clock, self.now)
        if iteration is None:
            return
        gone = [i for i in self._instances(replica.workers) if i not in self.alive]
        if gone:
            self.violations.append(f"{replica.replica_id} ran on {gone[0]} outside its availability at {self.now}")
        replica.iterating = True
        if self.settings.shared_cores is not None:  # processes on one machine share its cores
            busy = sum(r.iterating for r in self.replicas.values())
            iteration.seconds *= max(1.0, busy / self.settings.shared_cores)
        self.at(self.now + iteration.seconds, lambda: self._iteration_done(replica, iteration))

    def _iteration_done(self, replica: SimReplica, iteration: Iteration) -> None:
        if self.replicas.get(replica.replica_id) is not replica:
            return  # lost meanwhile: nothing it computed counts
        starts = {r.request_id: r.done for r in iteration.requests}
        advanced = replica.finish_iteration(iteration, self.now)
        tokens, finished = [], []
        for request in advanced:
            if request.done >= request.max_new:
                finished.append(FinishCommit(request.request_id, "length", "", (0,) * request.done))
                self.finishes[request.request_id] = self.finishes.get(request.request_id, 0) + 1
                self.finished_at.setdefault(request.request_id, self.now)
            else:
                tokens.append(TokenCommit(request.request_id, starts[request.request_id], (0,)))
        loop = LoopCounters(replica.iterations, replica.busy_s, 0.0, replica.busy_s)
        self.send(ev.TokensCommitted(ReplicaCommit(replica.replica_id, loop, tuple(tokens), tuple(finished))))
        self.boundary(replica)

    def boundary(self, replica: SimReplica) -> None:
        """The replica is at a token boundary: run what waits for one, then go on."""
        pending, replica.at_boundary = replica.at_boundary, []
        for action in pending:
            action()
        self.kick(replica)

    def on_boundary(self, replica: SimReplica, action: Callable[[], None]) -> None:
        """Run `action` at the replica's next token boundary (now, if it is idle)."""
        replica.at_boundary.append(action)
        if not replica.iterating:
            self.boundary(replica)

    # ------------------------------------------------------------------ instructions
    def _enact(self, instruction: ins.Instruction) -> None:
        handler = getattr(self, f"_do_{type(instruction).__name__}")
        handler(instruction)

    def answer(self, delay: float, event: ev.Event) -> None:
        """Send `event` after `delay` seconds."""
        self.at(self.now + delay, lambda: self.send(event))

    def _do_DescribeModel(self, order: ins.DescribeModel) -> None:
        self.answer(0.0, ev.ModelDescribed(order.op, self.spec))

    def _do_StartReplica(self, order: ins.StartReplica) -> None:
        workers = order.shards or (order.leader,)
        scheduler = make_scheduler(self.settings.scheduler) if self.settings.scheduler else None
        replica = SimReplica(order.replica_id, order.leader, workers, order.parallel, self.settings.max_batch,
                             self.settings.batching, scheduler=scheduler)
        self.replicas[order.replica_id] = replica
        peer = self.replicas.get(order.weights_from or "")
        warm = self.settings.warm_start and self.now == 0.0
        seconds, from_peer = (0.0, 0) if warm else self._load(order.parallel, workers, peer)
        self._weights_at[order.replica_id] = self.now + seconds
        if not order.build:
            self.answer(0.0, ev.ReplicaCreated(order.op))
            return
        info = ReplicaInfo(order.replica_id, order.leader, self.spec.kv_bytes_per_token,
                           "peer" if from_peer else "checkpoint", from_peer, order.parallel, order.shards)
        build = 0.0 if warm else self.settings.engine_build_s
        self.at(self.now + seconds + build, lambda: self._ready(replica, order.op, info))

    def _load(self, parallel: tuple[int, int], workers: Sequence[str], peer: SimReplica | None) -> tuple[float, int]:
        """(seconds, bytes from the peer) to bring a new replica's weight slices in place."""
        per_instance = self.moves.bytes_per_instance(parallel, workers, self.instance_of)
        total = sum(per_instance.values())
        if peer is not None and peer.ready:
            self.weight_bytes_moved += total
            return max(per_instance.values()) / self.settings.link_bandwidth, total
        self.checkpoint_bytes += total
        return max(per_instance.values()) / self.settings.storage_bandwidth, 0

    def _ready(self, replica: SimReplica, op: int, info: ReplicaInfo) -> None:
        if self.replicas.get(replica.replica_id) is not replica:
            return
        replica.ready = True
        self._check_exclusive(replica)
        self.send(ev.ReplicaReady(op, info))
        self.kick(replica)

    def _check_exclusive(self, replica: SimReplica) -> None:
        """Invariant: a replica taking its workers shares none with another ready replica."""
        mine = set(replica.workers)
        for other in self.replicas.values():
            if other is not replica and other.ready and mine & set(other.workers):
                self.violations.append(f"{replica.replica_id} and {other.replica_id} both hold "
                                       f"{sorted(mine & set(other.workers))[0]} at {self.now:.1f} s")

    def _do_BuildReplica(self, order: ins.BuildReplica) -> None:
        replica = self.replicas.get(order.replica_id)
        if replica is None:
            self.answer(0.0, ev.OperationFailed(order.op, "no such replica"))
            return
        info = ReplicaInfo(order.replica_id, replica.leader, self.spec.kv_bytes_per_token, "peer", 0,
                           replica.parallel, replica.workers if len(replica.workers) > 1 else ())
        done = max(self.now + self.settings.engine_build_s, self._weights_at.get(order.replica_id, self.now))
        self.at(done, lambda: self._ready(replica, order.op, info))

    def _do_ReloadReplica(self, order: ins.ReloadReplica) -> None:
        replica = self.replicas.get(order.replica_id)
        if replica is None:
            self.answer(0.0, ev.OperationFailed(order.op, "no such replica"))
            return
        replica.ready = False
        replica.clear()
        seconds, _ = self._load(replica.parallel, replica.workers, None)
        info = ReplicaInfo(order.replica_id, replica.leader, self.spec.kv_bytes_per_token, "checkpoint", 0,
                           replica.parallel, replica.workers if len(replica.workers) > 1 else ())
        self.at(self.now + seconds + self.settings.engine_build_s, lambda: self._ready(replica, order.op, info))

    def _do_AssignRequests(self, order: ins.AssignRequests) -> None:
        replica = self.replicas.get(order.replica_id)
        if replica is None:
            self.answer(0.0, ev.OperationFailed(order.op, "no such replica"))
            return
        for work in order.requests:
            replica.add(SimRequest(work.request_id, len(work.prompt_token_ids), work.params.max_new_tokens,
                                   len(work.committed), has_kv=False), self.now)
        self.answer(0.0, ev.RequestsAssigned(order.op))
        self.kick(replica)

    def _do_CancelRequests(self, order: ins.CancelRequests) -> None:
        replica = self.replicas.get(order.replica_id)
        if replica is not None:
            for request_id in order.request_ids:
                replica.remove(request_id)
        self.moves.cancel(order.replica_id, order.request_ids)

    def _do_MigrateRequests(self, order: ins.MigrateRequests) -> None:
        self._move_requests(order.op, order.source, order.target, order.request_ids)

    def _do_HandOver(self, order: ins.HandOver) -> None:
        self._move_requests(order.op, order.source, order.successor, order.request_ids)

    def _move_requests(self, op: int, source_id: str, target_id: str, request_ids: Sequence[str]) -> None:
        source = self.replicas.get(source_id)
        if source is None:
            self.answer(0.0, ev.OperationFailed(op, f"replica {source_id} is gone"))
            return

        def pause_and_send() -> None:
            moving = [r for r in (source.remove(i) for i in request_ids) if r is not None]
            nbytes = sum(kv_bytes(self.spec, r) for r in moving)
            ticket = self.moves.open(target_id, moving)
            self.at(self.now + nbytes / self.settings.link_bandwidth, lambda: self._arrive(op, target_id, ticket))

        self.on_boundary(source, pause_and_send)

    def _arrive(self, op: int, target_id: str, ticket: int) -> None:
        moving = self.moves.close(ticket)
        target = self.replicas.get(target_id)
        if target is None:
            self.send(ev.OperationFailed(op, f"replica {target_id} is gone"))
            return
        for request in moving:
            request.has_kv = True
            target.add(request, self.now)
        self.send(ev.TransferDone(op, tuple(self.moves.moved(r) for r in moving)))
        self.kick(target)

    def _do_Reshard(self, order: ins.Reshard) -> None:
        replica = self.replicas.get(order.replica_id)
        if replica is None:
            self.answer(0.0, ev.OperationFailed(order.op, "no such replica"))
            return

        def switch() -> None:
            replica.paused = True
            plan = self.moves.reshard(replica, order, self.instance_of, self.spec)
            self.weight_bytes_moved += plan.weight_bytes
            self.checkpoint_bytes += plan.checkpoint_bytes
            self.at(self.now + plan.pause_s, lambda: self._resharded(replica, order, plan))

        self.on_boundary(replica, switch)

    def _resharded(self, replica: SimReplica, order: ins.Reshard, plan: ReshardPlan) -> None:
        if self.replicas.get(replica.replica_id) is not replica:
            return
        old = replica.parallel
        replica.parallel, replica.workers, replica.paused = order.parallel, order.workers, False
        replica.epoch += 1
        self._check_exclusive(replica)
        self.send(ev.ReshardDone(order.op, plan.summary(old, order, replica.epoch)))
        self.kick(replica)

    def _do_StopReplica(self, order: ins.StopReplica) -> None:
        self.replicas.pop(order.replica_id, None)

    def _do_RetireReplica(self, order: ins.RetireReplica) -> None:
        self.replicas.pop(order.replica_id, None)
        self.answer(0.0, ev.ReplicaStopped(order.op))

    def _do_RestartWorkers(self, order: ins.RestartWorkers) -> None:
        for worker in order.workers:
            instance = self.instance_of(worker)
            self.send(ev.WorkerLost(worker))
            if instance in self.alive:
                market = self.alive[instance][0]
                price = self.settings.spot_price if market == "spot" else self.settings.on_demand_price
                joined = ev.WorkerJoined(worker, market, price / self.settings.gpus_per_instance,
                                         self.settings.gpu_memory_bytes)
                self.at(self.now + self.settings.restart_delay_s,
                        lambda i=instance, j=joined: self.send(j) if i in self.alive else None)

    def _do_NotifyClients(self, order: ins.NotifyClients) -> None:
        pass  # no clients to wake in a simulation

    def _do_WakeAt(self, order: ins.WakeAt) -> None:
        if order.time not in self._ticks:
            self._ticks.add(order.time)
            self.at(order.time, lambda: (self._ticks.discard(order.time), self.send(ev.Tick())))

    def _do_AcquireCapacity(self, order: ins.AcquireCapacity) -> None:
        """On-demand instances come after the start delay, billed from now. Spot capacity is what
        the availability trace gives: a spot request is not granted."""
        if order.market != "on-demand":
            return
        asked_at = self.now
        for _ in range(order.count):
            name = f"acquired-{self.acquired}"
            self.acquired += 1
            self.at(self.now + self.settings.acquire_delay_s,
                    lambda n=name: self._instance_added(n, "on-demand", billed_from=asked_at))

    def _do_ReleaseCapacity(self, order: ins.ReleaseCapacity) -> None:
        instance = self.instance_of(order.worker)
        if instance not in self.alive:
            return
        released = self._released.setdefault(instance, set())
        released.add(order.worker)
        if released >= set(self.gpus(instance)):
            del self._released[instance]
            self.released += 1
            self.at(self.now, lambda: self._instance_removed(instance))

    # ------------------------------------------------------------------ figures
    def _result(self, arrivals: Sequence[Arrival], end: float, trace_end: float) -> SimResult:
        held = dict(self.held_s)
        for market, since in self.alive.values():
            held[market] += max(end, trace_end) - since
        cost = (held["spot"] * self.settings.spot_price + held["on-demand"] * self.settings.on_demand_price) / 3600
        on_demand = (held["spot"] + held["on-demand"]) * self.settings.on_demand_price / 3600
        latencies = np.array([self.finished_at[r] - self.arrived[r] for r in self.finished_at]) if self.finished_at \
            else np.array([float("nan")])
        tokens = sum(a.input_len + (a.output_len or self.settings.output_tokens) for a in arrivals)
        status = self.fleet.status(self.now)
        violations = list(self.violations)
        twice = [r for r, n in self.finishes.items() if n > 1]
        if twice:
            violations.append(f"{len(twice)} requests finished more than once (e.g. {twice[0]})")
        if status["finished"] != len(self.finished_at):
            violations.append(f"the fleet counts {status['finished']} finished, the simulator {len(self.finished_at)}")
        return SimResult(
            policy=self.fleet.policy.name, requests=len(arrivals), finished=len(self.finished_at),
            latency_mean_s=float(latencies.mean()), latency_p50_s=float(np.percentile(latencies, 50)),
            latency_p99_s=float(np.percentile(latencies, 99)),
            requests_restarted=int(status["requests_restarted"]), tokens_recomputed=int(status["tokens_recomputed"]),
            kv_bytes_migrated=int(status["kv_bytes_migrated"]), weight_bytes_moved=self.weight_bytes_moved,
            checkpoint_bytes=self.checkpoint_bytes, spot_instance_s=held["spot"],
            on_demand_instance_s=held["on-demand"], cost_usd=cost, on_demand_cost_usd=on_demand,
            cost_per_token=cost * 1e5 / tokens if tokens else float("nan"), simulated_s=end, events=self._events,
            instances_acquired=self.acquired, instances_released=self.released,
            violations=tuple(violations), status=status)
