"""The fleet policies as strategy classes: what differs between SpotServe and its baselines.

`FleetState` makes every decision; where the policies differ it asks the policy:

- how a noticed replica's requests leave it (`plan_evacuation`: SpotServe decodes as long as the
  grace period allows, then moves them WITH their KV; the baselines restart them elsewhere);
- whether a lost replica's requests resume from their committed tokens or restart from scratch;
- where a new replica's weights come from (a ready peer, or the checkpoint);
- whether replica shapes adapt to the workers and the load (SpotServe) or stay as first chosen;
- what a sharded replica does when one of its workers is noticed (reshard, or dissolve) and when
  its leader is (hand everything to a successor, or evacuate);
- whether any membership change restarts every replica (reparallelize).

SpotServe's four ablations are switches of `SpotServe` (the paper's Figure 9): no adaptive
configuration (fixed P and M), no migration planner (move everything, then resume), no
interruption arranger (pause at the notice instead of decoding through the grace period), no
device mapper (workers keep the given order instead of Kuhn-Munkres). Pure policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from elastic_llm.control.capacity import CapacityPolicy
from elastic_llm.planning.arrangement import (
    GracePeriod,
    MigrationTimeModel,
    RunningBatch,
    RunningRequest,
    arrange,
)


class UnknownPolicyError(ValueError):
    """A policy name that is not one of `POLICY_NAMES`."""


@dataclass(frozen=True)
class EvacuationPlan:
    """How a noticed replica's requests leave it."""

    start_at: float  #: when they leave (it decodes until then)
    migrate: bool  #: True: they move with their KV; False: they restart elsewhere from scratch
    recompute: frozenset[str] = frozenset()  #: (migrate) these resume elsewhere by recomputing


@dataclass(frozen=True)
class FleetPolicy:
    """Base of the fleet policies (see the module docstring for what each decision means)."""

    name: str = "base"  #: the policy's name (`policy_by_name`)
    #: a lost replica's requests resume from their committed tokens (else restart from scratch)
    resumes_progress: bool = True
    weights_from_peers: bool = False  #: a new whole-model replica takes a ready peer's weights
    adapts_shape: bool = False  #: replica shapes follow the workers and the load
    restarts_everything: bool = False  #: any membership change restarts every replica and request
    shard_notice: Literal["reshard", "dissolve"] = "dissolve"  #: a noticed shard worker's replica
    leader_notice: Literal["replace", "evacuate"] = "evacuate"  #: a noticed leader's replica
    use_mapper: bool = True  #: Kuhn-Munkres device mapping in a reshard
    progressive: bool = True  #: progressive, memory-bounded migration in a reshard
    #: how many instances to hold, of which market (`elastic_llm.control.capacity`); None: what
    #: the market gives (SpotServe's artifact and the baselines)
    capacity: CapacityPolicy | None = None

    def plan_evacuation(self, now: float, deadline: float, requests: Sequence[RunningRequest],
                        step_seconds: float, migration: MigrationTimeModel) -> EvacuationPlan:
        """(The baselines) the requests restart elsewhere just before the deadline."""
        return EvacuationPlan(max(now, deadline - migration.base_seconds), migrate=False)


@dataclass(frozen=True)
class SpotServe(FleetPolicy):
    """SpotServe: stateful migration on notice, adaptive shapes, peer weights; ablation switches."""

    name: str = "spotserve"
    weights_from_peers: bool = True
    adapts_shape: bool = True
    shard_notice: Literal["reshard", "dissolve"] = "reshard"
    leader_notice: Literal["replace", "evacuate"] = "replace"
    arranger: bool = True  #: SpotServe's interruption arranger (decode through the grace period)

    def plan_evacuation(self, now: float, deadline: float, requests: Sequence[RunningRequest],
                        step_seconds: float, migration: MigrationTimeModel) -> EvacuationPlan:
        """Decode as long as the grace period allows, then move each request whose KV fits the
        remaining window (the arrangement); without the arranger, move them all at once."""
        if not self.arranger or not requests:
            return EvacuationPlan(now, migrate=True)
        plan = arrange(now, GracePeriod(now, max(0.0, deadline - now)), [RunningBatch(0, step_seconds, now)],
                       list(requests), migration)
        return EvacuationPlan(plan.migration_start, migrate=True, recompute=frozenset(plan.recompute))


@dataclass(frozen=True)
class Reroute(FleetPolicy):
    """Baseline: requests of a lost or noticed replica restart elsewhere; shapes stay fixed."""

    name: str = "reroute"
    resumes_progress: bool = False


@dataclass(frozen=True)
class Reparallelize(FleetPolicy):
    """Baseline: every membership change reloads every replica, in the configuration the optimizer
    chooses for the new workers (the artifact's ``baseline`` solves again at every event), and
    restarts every request."""

    name: str = "reparallelize"
    resumes_progress: bool = False
    adapts_shape: bool = True
    restarts_everything: bool = True


@dataclass(frozen=True)
class BeyondSpotServe(SpotServe):
    """SpotServe plus capacity decisions (`elastic_llm.control.capacity`): on-demand fallback when
    the usable spot capacity cannot meet the required rate, given back first when spot returns;
    optionally over-provisioning (SkyServe) and giving back spot instances no replica holds."""

    name: str = "beyond"
    capacity: CapacityPolicy | None = CapacityPolicy()


_POLICIES: dict[str, FleetPolicy] = {
    "spotserve": SpotServe(),
    "reroute": Reroute(),
    "reparallelize": Reparallelize(),
    "spotserve-no-adaptive": SpotServe(name="spotserve-no-adaptive", adapts_shape=False),
    "spotserve-no-planner": SpotServe(name="spotserve-no-planner", progressive=False),
    "spotserve-no-arranger": SpotServe(name="spotserve-no-arranger", arranger=False),
    "spotserve-no-mapper": SpotServe(name="spotserve-no-mapper", use_mapper=False),
    "beyond": BeyondSpotServe(),
    "beyond-release-spot": BeyondSpotServe(name="beyond-release-spot", capacity=CapacityPolicy(release_spot=True)),
    "beyond-overprovision": BeyondSpotServe(name="beyond-overprovision", capacity=CapacityPolicy(overprovision=1)),
}

#: Every policy name `policy_by_name` knows: the three policies, SpotServe's ablations, then the
#: capacity-aware ones (``beyond``: on-demand fallback, on-demand given back first; ``-release-spot``:
#: also spot instances no replica holds; ``-overprovision``: one replica more than the rate needs).
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def policy_by_name(name: str | FleetPolicy) -> FleetPolicy:
    """The policy called `name` (a `FleetPolicy` is returned as it is).

    Raises `UnknownPolicyError` naming the choices for any other name."""
    if isinstance(name, FleetPolicy):
        return name
    if name not in _POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")
    return _POLICIES[name]


def compressed(policy: str | FleetPolicy, time_scale: float) -> FleetPolicy:
    """`policy` for a replay at `time_scale` trace seconds per wall second: a capacity-aware one
    gets its `CapacityPolicy` periods divided by `time_scale` (others are returned unchanged)."""
    chosen = policy_by_name(policy)
    if chosen.capacity is None:
        return chosen
    return replace(chosen, capacity=chosen.capacity.compressed(time_scale))

