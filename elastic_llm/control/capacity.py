"""How much capacity the fleet holds: cost-aware on-demand fallback, over-provisioning, release.

SpotServe's artifact serves with whatever spot instances the market gives it. A capacity-aware
policy (`FleetPolicy.capacity` set, e.g. the ``beyond`` policy) also decides how many instances to
hold, in the same state machine as every other decision:

- **need**: the fewest workers on which the planning core's configuration meets the arrival rate
  (`ShapeChoice.workers_needed`), plus `CapacityPolicy.overprovision` replicas of that shape
  (SkyServe's ``num_overprovision``);
- **on-demand fallback**: when the usable workers (neither leaving nor suspect) plus those
  already asked for fall short of the need, `AcquireCapacity(count, "on-demand")` asks for the
  missing instances (SkyServe's ``dynamic_ondemand_fallback``; SpotServe's paper mentions it, its
  artifact has none);
- **release**: when the usable workers exceed the need by a whole instance for
  `release_after_s`, one instance is given back per check, on-demand ones first: an on-demand
  instance that holds a replica is drained like a preemption with a grace period of our choosing
  (its workers are noticed, so SpotServe's migration moves its requests WITH their KV), then
  `ReleaseCapacity(worker)` goes out for each of its workers; with `release_spot`, a spot
  instance is given back too, but only when no replica holds any of its workers.

Instances: workers named ``<instance>/g<i>`` are the GPUs of one instance (the simulator's naming);
any other address is an instance of its own (the live system: one worker process per instance).
Pure: no torch, no dask, no clock, no I/O; time is the transition's `now`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.fleet import WorkerHealth

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState

_GPU = re.compile(r"^(.+)/g\d+$")


def instance_of(address: str) -> str:
    """The instance a worker address belongs to (``node-3/g1`` -> ``node-3``; else the address)."""
    match = _GPU.match(address)
    return match.group(1) if match else address


@dataclass(frozen=True)
class CapacityPolicy:
    """The knobs of a capacity-aware policy (how many instances it holds, and of which market)."""

    on_demand_fallback: bool = True  #: ask for on-demand instances when usable capacity falls short
    overprovision: int = 0  #: replicas held beyond what the required rate needs (SkyServe)
    #: give back spot instances no replica holds while in surplus (off by default: measured to
    #: lose the buffer a clustered preemption needs, docs/benchmarks.md "Beyond SpotServe")
    release_spot: bool = False
    release_after_s: float = 60.0  #: a surplus must last this long before an instance goes back
    #: a shortfall must last this long before instances are asked for (workers join one event at
    #: a time at start-up; a fleet that is still filling is not short)
    acquire_after_s: float = 5.0
    drain_s: float = 30.0  #: an on-demand instance given back is drained this long (a self-notice)
    acquire_timeout_s: float = 900.0  #: an acquisition not seen joining by then is forgotten
    max_on_demand: int = 16  #: most on-demand instances held or asked for at once
    check_s: float = 5.0  #: period of the capacity check (it also runs when workers join or go)

    def __post_init__(self) -> None:
        for name in _PERIODS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CapacityPolicy.{name} must be a finite number >= 0, got {value!r}")
        if self.overprovision < 0 or self.max_on_demand < 0:
            raise ValueError("CapacityPolicy.overprovision and max_on_demand must be >= 0")

    def compressed(self, time_scale: float) -> CapacityPolicy:
        """This policy for a replay that runs `time_scale` trace seconds per wall second: every
        period divided by `time_scale`, so its decisions fall where they would in trace time."""
        if not (isinstance(time_scale, (int, float)) and math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
        return replace(self, **{name: getattr(self, name) / time_scale for name in _PERIODS})


#: The `CapacityPolicy` fields that are periods (seconds).
_PERIODS = ("release_after_s", "acquire_after_s", "drain_s", "acquire_timeout_s", "check_s")


@dataclass
class Acquisition:
    """Instances asked for and not seen joining yet."""

    asked_at: float  #: when `AcquireCapacity` went out
    instances: int  #: how many are still expected


@dataclass
class CapacityState:
    """What a capacity-aware policy has asked for and is giving back (one per `FleetState`)."""

    pending: list[Acquisition] = field(default_factory=list)  #: acquisitions still expected
    draining: dict[str, float] = field(default_factory=dict)  #: worker -> when it is given back
    acquired: int = 0  #: instances asked for, in all
    released: int = 0  #: instances given back, in all
    decisions: list[dict[str, object]] = field(default_factory=list)  #: the latest 1000 decisions
    surplus_since: float | None = None  #: since when the usable workers exceed the need
    short_since: float | None = None  #: since when the usable and expected workers fall short of it
    #: the latest per-worker memory budget seen (planning goes on with it when no worker is usable)
    memory_bytes: int = 0
    _seen: set[str] = field(default_factory=set)  # on-demand instances seen joining
    _next_check: float = -math.inf
    _workers_seen: int = -1

    @property
    def expected(self) -> int:
        """Instances asked for and not seen joining yet."""
        return sum(a.instances for a in self.pending)

    def advance(self, fleet: FleetState) -> None:
        """Called in every transition (`FleetState._advance`): finish due drains, then, when the
        check is due or membership changed, acquire or release one step toward the need."""
        policy = fleet.policy.capacity
        if policy is None:
            return
        now = fleet.now
        self._finish_drains(fleet)
        if now < self._next_check and len(fleet.workers) == self._workers_seen:
            return
        self._match_joins(fleet, policy)
        self._next_check, self._workers_seen = now + policy.check_s, len(fleet.workers)
        fleet.emit(ins.WakeAt(self._next_check))
        self._check(fleet, policy)

    # ------------------------------------------------------------------ the check
    def _check(self, fleet: FleetState, policy: CapacityPolicy) -> None:
        usable = [w for w in fleet.usable_workers() if w not in self.draining]
        per_instance = max((len(g) for g in _instances(fleet.workers).values()), default=1)
        self.memory_bytes = fleet.memory_budget() or self.memory_bytes  # 0: no usable worker announced one
        if self.memory_bytes < 1:
            return  # no worker seen yet: nothing to plan with
        needed = fleet.shapes.workers_needed(fleet.arrival_rate(), self.memory_bytes,
                                             len(usable) + policy.max_on_demand * per_instance)
        if needed is None:
            return
        workers, shape = needed
        target = workers + policy.overprovision * shape[0] * shape[1]
        expected = self.expected * per_instance
        if len(usable) + expected < target:
            self.surplus_since = None
            if self.short_since is None:
                self.short_since = fleet.now
                fleet.emit(ins.WakeAt(fleet.now + policy.acquire_after_s))
            if policy.on_demand_fallback and fleet.now - self.short_since >= policy.acquire_after_s:
                self._acquire(fleet, policy, math.ceil((target - len(usable) - expected) / per_instance))
                self.short_since = None
            return
        self.short_since = None
        if len(usable) - target < per_instance:
            self.surplus_since = None
            return
        if self.surplus_since is None:
            self.surplus_since = fleet.now
        if fleet.now - self.surplus_since >= policy.release_after_s:
            self._release_one(fleet, policy, set(usable))

    def _acquire(self, fleet: FleetState, policy: CapacityPolicy, count: int) -> None:
        held = {instance_of(w) for w, r in fleet.workers.items() if r.market == "on-demand"}
        count = min(count, policy.max_on_demand - len(held) - self.expected)
        if count < 1:
            return
        self.pending.append(Acquisition(fleet.now, count))
        self.acquired += count
        self._note(fleet, "acquire", count=count, market="on-demand")
        fleet.emit(ins.AcquireCapacity(count, "on-demand"))

    def _release_one(self, fleet: FleetState, policy: CapacityPolicy, usable: set[str]) -> None:
        """Give back one whole instance: on-demand first (drained), else a spot one nobody holds."""
        held = {w for r in fleet.replicas.values() for w in (*r.workers, *r.reserved)}
        groups = [(name, workers) for name, workers in sorted(_instances(fleet.workers).items())
                  if all(w in usable for w in workers)]
        on_demand = [g for g in groups if fleet.workers[g[1][0]].market == "on-demand"]
        # the least used on-demand instance first: fewest workers in replicas
        for name, workers in sorted(on_demand, key=lambda g: (sum(w in held for w in g[1]), g[0])):
            if any(w in held for w in workers):
                self._drain(fleet, policy, name, workers)
            else:
                self._give_back(fleet, name, workers)
            return
        if policy.release_spot:
            for name, workers in groups:
                if not any(w in held for w in workers):
                    self._give_back(fleet, name, workers)
                    return

    def _drain(self, fleet: FleetState, policy: CapacityPolicy, name: str, workers: list[str]) -> None:
        """Notice the instance's workers ourselves (leaders last, as the simulator does for a real
        notice), and give it back at the deadline."""
        deadline = fleet.now + policy.drain_s
        leaders = {r.leader for r in fleet.replicas.values()}
        for worker in sorted(workers, key=lambda w: w in leaders):
            self.draining[worker] = deadline
            fleet._on_WorkerNoticed(ev.WorkerNoticed(worker, deadline))  # noqa: SLF001 (same transition)
        self._note(fleet, "drain", instance=name, until=deadline)
        fleet.emit(ins.WakeAt(deadline))
        self.surplus_since = None

    def _give_back(self, fleet: FleetState, name: str, workers: list[str]) -> None:
        for worker in workers:
            fleet.emit(ins.ReleaseCapacity(worker))
            if worker in fleet.workers:  # out of use at once; its `WorkerLost` follows
                fleet.workers[worker].health = WorkerHealth.LEAVING
        self.released += 1
        self._note(fleet, "release", instance=name, market=fleet.workers[workers[0]].market)
        self.surplus_since = None

    def _finish_drains(self, fleet: FleetState) -> None:
        due = sorted(w for w, at in self.draining.items() if at <= fleet.now)
        for name, workers in _instances({w: None for w in due}).items():
            for worker in workers:
                del self.draining[worker]
            present = [w for w in workers if w in fleet.workers]
            if present:
                self._give_back(fleet, name, present)

    def _match_joins(self, fleet: FleetState, policy: CapacityPolicy) -> None:
        """On-demand instances seen for the first time fulfil the oldest acquisitions."""
        for name in {instance_of(w) for w, r in fleet.workers.items() if r.market == "on-demand"} - self._seen:
            self._seen.add(name)
            if self.pending:
                self.pending[0].instances -= 1
                if self.pending[0].instances <= 0:
                    self.pending.pop(0)
        self.pending = [a for a in self.pending if fleet.now - a.asked_at < policy.acquire_timeout_s]

    def _note(self, fleet: FleetState, action: str, **details: object) -> None:
        self.decisions.append({"time": fleet.now, "action": action, **details})
        del self.decisions[:-1000]


def _instances(workers: dict[str, object]) -> dict[str, list[str]]:
    """Worker addresses grouped by instance, each group sorted."""
    groups: dict[str, list[str]] = {}
    for address in sorted(workers):
        groups.setdefault(instance_of(address), []).append(address)
    return groups
