"""The capacity-aware ``beyond`` policy's decisions as `FleetState` transitions (hand-driven)."""

from __future__ import annotations

import pytest

from elastic_llm.control import FleetConfig, WorkerHealth
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.capacity import CapacityPolicy, instance_of
from elastic_llm.control.policies import policy_by_name
from tests.control.harness import Harness


def _harness(policy: str, need: tuple[int, tuple[int, int]], parallel: tuple[int, int] = (1, 1)) -> Harness:
    """A fleet whose planner says `need` = (workers, replica shape) for any rate."""
    h = Harness(policy, FleetConfig(parallel=parallel))
    h.fleet.shapes.workers_needed = lambda rate, memory, most: need  # type: ignore[method-assign]
    return h


def test_instances_are_named_by_their_workers_and_the_beyond_policies_are_registered() -> None:
    assert instance_of("node-3/g1") == "node-3" and instance_of("tcp://127.0.0.1:4000") == "tcp://127.0.0.1:4000"
    assert policy_by_name("beyond").capacity == CapacityPolicy() and not CapacityPolicy().release_spot
    assert policy_by_name("beyond-overprovision").capacity.overprovision == 1  # type: ignore[union-attr]
    assert policy_by_name("spotserve").capacity is None
    with pytest.raises(ValueError, match="drain_s"):
        CapacityPolicy(drain_s=-1.0)


def test_spotserve_never_asks_for_capacity() -> None:
    h = _harness("spotserve", (4, (1, 1)))
    h.join("s0", "s1")
    h.tick(h.now + 10)
    assert not h.of(ins.AcquireCapacity) and not h.of(ins.ReleaseCapacity)


def test_a_notice_that_leaves_too_few_workers_acquires_on_demand_once_and_spot_back_releases_it_first() -> None:
    h = _harness("beyond", (3, (1, 1)))
    h.join("s0", "s1", "s2", market="spot")
    h.tick(h.now + 10)
    assert not h.of(ins.AcquireCapacity)  # 3 usable meet the need of 3
    h.send(ev.WorkerNoticed("s0", h.now + 30))
    h.tick(h.now + 5)  # the periodic check sees the shortfall ...
    assert not h.of(ins.AcquireCapacity)  # ... which must last `acquire_after_s` (5 s)
    h.tick(h.now + 5)
    (acquire,) = h.of(ins.AcquireCapacity)
    assert (acquire.count, acquire.market) == (1, "on-demand")
    h.tick(h.now + 10)
    h.tick(h.now + 10)
    assert len(h.of(ins.AcquireCapacity)) == 1  # the pending one counts: no second request
    h.send(ev.WorkerLost("s0"), at=h.now + 20)
    h.join("od0", market="on-demand", price_per_hour=3.9)
    h.join("s3", market="spot")  # spot is back: one instance more than needed
    h.tick(h.now + 10)
    assert not h.of(ins.ReleaseCapacity) and "od0" not in h.fleet.capacity.draining  # not before 60 s
    h.tick(h.now + 61)
    assert h.fleet.workers["od0"].health is WorkerHealth.LEAVING  # drained like a preemption
    assert h.fleet.capacity.draining == {"od0": pytest.approx(h.now + 30)}
    assert not h.of(ins.ReleaseCapacity)
    h.tick(h.now + 31)
    assert [r.worker for r in h.of(ins.ReleaseCapacity)] == ["od0"]  # on-demand first, spot kept
    assert h.fleet.capacity.acquired == 1 and h.fleet.capacity.released == 1
    figures = h.fleet.status(h.now)["capacity"]
    assert (figures["acquired"], figures["released"], figures["expected"]) == (1, 1, 0)
    assert [d["action"] for d in figures["decisions"]] == ["acquire", "drain", "release"]


def test_over_provisioning_asks_for_one_replica_more_than_the_rate_needs() -> None:
    plain, over = _harness("beyond", (2, (1, 2)), parallel=(1, 2)), _harness("beyond-overprovision", (2, (1, 2)),
                                                                            parallel=(1, 2))
    for h in (plain, over):
        h.join("n0/g0", "n0/g1")
        h.tick(h.now + 10)
        h.tick(h.now + 10)
    assert not plain.of(ins.AcquireCapacity)  # the one instance meets the rate
    (acquire,) = over.of(ins.AcquireCapacity)  # plus one (1, 2) replica: one more 2-GPU instance
    assert (acquire.count, acquire.market) == (1, "on-demand")


def test_with_release_spot_a_spot_instance_no_replica_holds_is_given_back_in_surplus_and_a_held_one_is_not() -> None:
    h = _harness("beyond-release-spot", (4, (2, 2)), parallel=(2, 2))
    h.join(*(f"n{i}/g{k}" for i in range(3) for k in range(2)), ready=False, market="spot")
    (start,) = h.of(ins.StartReplica)
    assert set(start.shards) == {"n0/g0", "n0/g1", "n1/g0", "n1/g1"}
    h.ready(start)
    h.tick(h.now + 10)
    h.tick(h.now + 61)
    assert sorted(r.worker for r in h.of(ins.ReleaseCapacity)) == ["n2/g0", "n2/g1"]
    h.tick(h.now + 61)
    assert len(h.of(ins.ReleaseCapacity)) == 2  # what is left is what the need holds
    assert not h.of(ins.AcquireCapacity)


def test_by_default_spot_instances_are_kept_in_surplus() -> None:
    h = _harness("beyond", (4, (2, 2)), parallel=(2, 2))
    h.join(*(f"n{i}/g{k}" for i in range(3) for k in range(2)), market="spot")
    h.tick(h.now + 10)
    h.tick(h.now + 61)
    assert not h.of(ins.ReleaseCapacity) and not h.of(ins.AcquireCapacity)


def test_a_compressed_capacity_policy_divides_every_period_and_keeps_the_rest() -> None:
    from elastic_llm.control.policies import compressed, policy_by_name

    beyond = compressed("beyond-overprovision", 30.0)
    assert beyond.capacity is not None and beyond.name == "beyond-overprovision"
    assert (beyond.capacity.acquire_after_s, beyond.capacity.release_after_s, beyond.capacity.drain_s,
            beyond.capacity.check_s) == pytest.approx((5 / 30, 60 / 30, 30 / 30, 5 / 30))
    assert beyond.capacity.overprovision == 1 and beyond.capacity.max_on_demand == 16
    assert compressed("spotserve", 30.0) is policy_by_name("spotserve")  # no capacity decisions
    with pytest.raises(ValueError, match="time_scale"):
        compressed("beyond", 0.0)


def test_losing_every_worker_plans_with_the_last_memory_budget_and_acquires_on_demand() -> None:
    h = Harness("beyond", FleetConfig(parallel=(1, 1)))
    budgets: list[int] = []

    def needed(rate: float, memory: int, most: int) -> tuple[int, tuple[int, int]]:
        if memory < 1:  # as the measured profile does: a transition must never pass it 0
            raise ValueError("device_memory_bytes must be > 0")
        budgets.append(memory)
        return (2, (1, 1))

    h.fleet.shapes.workers_needed = needed  # type: ignore[method-assign]
    h.join("s0", "s1", market="spot", memory_bytes=2**30)
    h.tick(h.now + 10)
    h.send(ev.WorkerLost("s0"), at=h.now + 1)
    h.send(ev.WorkerLost("s1"))  # no usable worker left: the budget is no longer announced
    h.tick(h.now + 6)
    (acquire,) = h.of(ins.AcquireCapacity)
    assert (acquire.count, acquire.market) == (2, "on-demand") and set(budgets) == {2**30}
