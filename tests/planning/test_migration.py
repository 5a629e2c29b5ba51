"""Migration planner: replaying a plan unit by unit gives every position exactly what it needs."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_llm.planning.config import ParallelConfig, Placement, Position, Worker
from elastic_llm.planning.errors import MemoryBoundError
from elastic_llm.planning.mapper import DeviceMapper
from elastic_llm.planning.migration import MigrationPlan, MigrationPlanner
from elastic_llm.planning.migration_index import _Senders
from elastic_llm.planning.slices import SliceAlgebra

from .helpers import FAST, Unit, position_units, tiny_model, unit_bytes, units_of

MODEL = tiny_model()
ALGEBRA = SliceAlgebra(MODEL)
BIG = 1 << 40


def replay(plan: MigrationPlan, old: Placement | None, new: Placement, workers: list[Worker],
           tokens: dict[int, int], inherits: tuple[int | None, ...]) -> dict[str, int]:
    """Execute ``plan`` on unit sets, asserting every rule; returns the peak bytes per worker."""
    budget = {w.name: w.memory_bytes for w in workers}
    held: dict[str, set[Unit]] = defaultdict(set)
    if old is not None:
        for pos, name in old.items():
            if name in budget:
                held[name] = position_units(ALGEBRA, old.config, pos, pos.replica,
                                            tokens.get(pos.replica, 0))
    need: dict[str, set[Unit]] = {}
    for pos, name in new.items():
        batch = inherits[pos.replica]
        keep = batch is not None and batch not in plan.lost_batches
        need[name] = position_units(ALGEBRA, new.config, pos, batch if keep else -1,
                                    tokens.get(batch, 0) if keep else 0)
    usage = {name: unit_bytes(ALGEBRA, held[name], tokens) for name in budget}
    peak = dict(usage)
    frees = defaultdict(list)
    for r in plan.releases:
        frees[r.after].append(r)

    def release(after: int) -> None:
        for r in frees[after]:
            units = units_of([r.slice])
            assert units <= held[r.worker] and not units & need.get(r.worker, set())
            held[r.worker] -= units
            usage[r.worker] -= unit_bytes(ALGEBRA, units, tokens)

    release(-1)
    for i, t in enumerate(plan.transfers):
        units = units_of([t.slice])
        assert t.nbytes == unit_bytes(ALGEBRA, units, tokens)
        if t.src is None:
            assert not t.slice.is_kv  # only weights come from the checkpoint
        else:
            assert units <= held[t.src]  # the sender still holds it
        assert not units & held[t.dst]  # nothing sent to a holder, nothing sent twice
        assert units <= need[t.dst]  # nothing the target does not need
        held[t.dst] |= units
        usage[t.dst] += t.nbytes
        peak[t.dst] = max(peak[t.dst], usage[t.dst])
        assert usage[t.dst] <= budget[t.dst]  # memory bound
        release(i)
    for name in budget:
        assert held[name] == need.get(name, set())  # exactly the required slices, all else freed
    return peak


@st.composite
def migrations(draw: st.DrawFn, tight: bool = False):
    """A random reconfiguration of the tiny model, mapped by the KM mapper."""
    shapes = [(d, p, m) for d in (1, 2) for p in (1, 2, 4) for m in (1, 2, 4) if d * p * m <= 8]
    d, p, m = draw(st.sampled_from(shapes))
    old = ParallelConfig(d, p, m, 1)
    names = [f"w{i}" for i in range(old.num_positions)]
    fate = {n: draw(st.sampled_from(["stay", "stay", "leave", "lost"])) for n in names}
    fresh = [f"n{i}" for i in range(draw(st.integers(0, 4)))]
    staying = [n for n in names if fate[n] == "stay"] + fresh
    if not staying:
        staying = ["n_only"]
    nd, np_, nm = draw(st.sampled_from([s for s in shapes if s[0] * s[1] * s[2] <= len(staying)]))
    new_config = ParallelConfig(nd, np_, nm, 1)
    tokens = {r: draw(st.integers(0, 30)) for r in range(d)}
    slack = draw(st.integers(0, 60_000)) if tight else BIG
    memory = {n: (90_000 + slack if tight else BIG) for n in staying}
    targets = [Worker(n, memory_bytes=memory[n], bandwidth=1e6) for n in staying]
    leaving = [Worker(n, memory_bytes=BIG, bandwidth=1e6) for n in names if fate[n] == "leave"]
    old_placement = Placement(old, tuple(names))
    mapping = DeviceMapper(MODEL).map(targets, old_placement, new_config, tokens)
    return old_placement, mapping, targets + leaving, tokens


def _plan(old, mapping, workers, tokens) -> MigrationPlan:
    return MigrationPlanner(MODEL).plan(mapping.placement, workers, old, tokens, mapping.inherits)


@FAST
@given(migrations())
def test_plan_replays_to_exactly_the_required_slices_in_progressive_order(case) -> None:
    old, mapping, workers, tokens = case
    plan = _plan(old, mapping, workers, tokens)
    replay(plan, old, mapping.placement, workers, tokens, mapping.inherits)
    # unconstrained memory: KV first, then weights strictly front to back by layer
    kinds = [t.slice.is_kv for t in plan.transfers]
    assert kinds == sorted(kinds, reverse=True)
    layers = [t.slice.layer for t in plan.transfers if not t.slice.is_kv]
    assert layers == sorted(layers)
    # each stage is ready right after its own last incoming transfer
    last = {t.dst: i for i, t in enumerate(plan.transfers)}
    for ready in plan.readiness:
        names = [mapping.placement.worker_at(Position(ready.replica, ready.stage, r))
                 for r in range(mapping.placement.config.M)]
        assert ready.after == max(last.get(n, -1) for n in names)
    # the lost batches are exactly the ones with KV on a worker that vanished
    alive = {w.name for w in workers}
    lost = {pos.replica for pos, n in old.items() if n not in alive and tokens.get(pos.replica)}
    assert set(plan.lost_batches) == lost


@FAST
@given(migrations(tight=True))
def test_plan_respects_tight_memory_bounds_or_says_it_cannot(case) -> None:
    old, mapping, workers, tokens = case
    try:
        plan = _plan(old, mapping, workers, tokens)
    except MemoryBoundError:
        return
    peak = replay(plan, old, mapping.placement, workers, tokens, mapping.inherits)
    assert all(plan.peak_bytes[n] == peak[n] for n in peak)


def test_memory_bound_is_exact_and_infeasible_bounds_are_refused() -> None:
    # b moves from stage 1 of P=2 to the whole model (P=1): it keeps its layers and receives the
    # rest. A budget of exactly the final model size fits; one byte less cannot.
    old = Placement(ParallelConfig(1, 2, 1, 1), ("a", "b"))
    new = Placement(ParallelConfig(1, 1, 1, 1), ("b",))
    full = ALGEBRA.weight_bytes(new.config, 0, 0)
    workers = [Worker("a"), Worker("b", memory_bytes=full)]
    plan = MigrationPlanner(MODEL).plan(new, workers, old, {}, (0,))
    replay(plan, old, new, workers, {}, (0,))
    assert plan.peak_bytes["b"] == full
    with pytest.raises(MemoryBoundError):
        MigrationPlanner(MODEL).plan(new, [Worker("a"), Worker("b", memory_bytes=full - 1)],
                                     old, {}, (0,))


def test_memory_bound_reorders_layers_instead_of_overflowing() -> None:
    # P=4, one layer per stage. w3 (old last stage) becomes stage 0; fresh n becomes stage 3.
    # w3's budget only fits one stage, so layer 0 cannot land before w3 has sent its old
    # layer 3 + LM head to n: the plan must move the back layers first.
    config = ParallelConfig(1, 4, 1, 1)
    old = Placement(config, ("w0", "w1", "w2", "w3"))
    new = Placement(config, ("w3", "w1", "w2", "n"))
    bound = max(ALGEBRA.weight_bytes(config, 0, 0), ALGEBRA.weight_bytes(config, 3, 0))
    workers = [Worker("w0"), Worker("w1"), Worker("w2"), Worker("w3", memory_bytes=bound),
               Worker("n")]
    plan = MigrationPlanner(MODEL).plan(new, workers, old, {}, (0,))
    peak = replay(plan, old, new, workers, {}, (0,))
    assert peak["w3"] <= bound
    order = [t.slice.layer for t in plan.transfers]
    assert order != sorted(order) and plan.transfers[0].dst == "n"  # back layers move first
    assert plan.readiness[3].after < plan.readiness[0].after  # stage 3 ready before stage 0


def test_lost_workers_weights_come_from_the_checkpoint_and_their_kv_is_lost() -> None:
    old = Placement(ParallelConfig(1, 2, 1, 1), ("a", "b"))
    new = Placement(ParallelConfig(1, 2, 1, 1), ("a", "c"))
    workers = [Worker("a"), Worker("c")]  # b vanished without notice
    plan = MigrationPlanner(MODEL).plan(new, workers, old, {0: 12}, (0,))
    assert plan.lost_batches == (0,)
    assert plan.transfers and all(t.src is None and t.dst == "c" for t in plan.transfers)
    assert plan.weight_bytes == ALGEBRA.weight_bytes(new.config, 1, 0)
    replay(plan, old, new, workers, {0: 12}, (0,))


def test_senders_are_balanced_across_holders() -> None:
    # two replicas hold the whole model; a third, fresh replica loads it from both
    old = Placement(ParallelConfig(2, 1, 1, 1), ("a", "b"))
    new = Placement(ParallelConfig(3, 1, 1, 1), ("a", "b", "c"))
    workers = [Worker(n, bandwidth=1e6) for n in "abc"]
    plan = MigrationPlanner(MODEL).plan(new, workers, old, {}, (0, 1, None))
    sent = defaultdict(int)
    for t in plan.transfers:
        sent[t.src] += t.nbytes
    assert set(sent) == {"a", "b"}
    assert abs(sent["a"] - sent["b"]) <= max(t.nbytes for t in plan.transfers)
    # full duplex queues: two senders into one receiver still serialise on the receiver's link
    assert plan.estimated_seconds == pytest.approx(plan.weight_bytes / 1e6)


def test_unchanged_placement_moves_nothing() -> None:
    config = ParallelConfig(2, 2, 2, 1)
    old = Placement(config, tuple(f"w{i}" for i in range(8)))
    workers = [Worker(n) for n in old.workers]
    plan = MigrationPlanner(MODEL).plan(old, workers, old, {0: 5, 1: 9})
    assert plan.transfers == () and plan.estimated_seconds == 0.0
    assert plan.kv_total_bytes == 14 * MODEL.kv_bytes_per_token
    assert all(r.after == -1 for r in plan.readiness)


def test_cold_start_reads_everything_from_storage_at_its_bandwidth() -> None:
    config = ParallelConfig(1, 2, 1, 1)
    new = Placement(config, ("a", "b"))
    plan = MigrationPlanner(MODEL, storage_bandwidth=1e5).plan(
        new, [Worker("a", bandwidth=1e9), Worker("b", bandwidth=1e9)])
    per_worker = [ALGEBRA.weight_bytes(config, s, 0) for s in range(2)]
    assert plan.weight_bytes == sum(per_worker)
    assert plan.estimated_seconds == pytest.approx(max(per_worker) / 1e5)
    assert plan.time_model().base_seconds == pytest.approx(plan.estimated_seconds)


@FAST
@given(lists=st.lists(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8), min_size=1,
                      max_size=4),
       picks=st.lists(st.tuples(st.integers(0, 3), st.sampled_from("xyz"), st.integers(1, 5)),
                      max_size=40),
       local=st.booleans())
def test_least_loaded_sender_is_the_first_minimum_of_a_scan(
        lists: list[list[str]], picks: list[tuple[int, str, int]], local: bool) -> None:
    # the lazy heaps pick exactly what min() over the (same-instance) holders would
    instance_of = {n: "xyz"[i % 3] for i, n in enumerate("abcdefgh")}
    senders = _Senders(instance_of if local else None)
    sent: dict[str, int] = defaultdict(int)
    for which, instance, nbytes in picks:
        holders = lists[which % len(lists)]
        near = [n for n in holders if instance_of[n] == instance] if local else []
        expected = min(near or holders, key=sent.__getitem__)
        sent[expected] += nbytes
        assert senders.pick(holders, instance, nbytes) == expected
