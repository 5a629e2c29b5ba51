"""KM device mapper: optimal against brute force, identity on unchanged configs, inheritance."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from elastic_llm.model.spec import DESCRIBED_MODELS
from elastic_llm.planning.config import ParallelConfig, Placement, Position, Worker
from elastic_llm.planning.mapper import DeviceMapper, inherit_replicas
from elastic_llm.planning.slices import SliceAlgebra

from .helpers import FAST, position_units, tiny_model, unit_bytes

MODEL = tiny_model()
ALGEBRA = SliceAlgebra(MODEL)


def small_config(draw: st.DrawFn, limit: int) -> ParallelConfig:
    """A config of the tiny model with at most ``limit`` positions."""
    shapes = [(d, p, m) for d in (1, 2, 3) for p in (1, 2, 3, 4) for m in (1, 2, 4)
              if d * p * m <= limit]
    d, p, m = draw(st.sampled_from(shapes))
    return ParallelConfig(d, p, m, 1)


@st.composite
def scenarios(draw: st.DrawFn, group: int = 1, max_workers: int = 6):
    """(workers after the change, old placement, new config, kv tokens per old replica)."""
    old = small_config(draw, max_workers)
    names = [f"w{i}" for i in range(old.num_positions)]
    old_placement = Placement(old, tuple(names))
    survivors = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    fresh = [f"n{i}" for i in range(draw(st.integers(0, max_workers - len(survivors))))]
    pool = survivors + fresh
    if group > 1:  # whole instances: pad to a multiple of the group with more newcomers
        pool += [f"x{i}" for i in range(-len(pool) % group)]
    if not pool:
        pool = [f"n{i}" for i in range(group)]
    workers = [Worker(n, f"i{i // group}" if group > 1 else "") for i, n in enumerate(pool)]
    new = small_config(draw, len(workers))
    tokens = {r: draw(st.integers(0, 40)) for r in range(old.D)}
    return workers, old_placement, new, tokens


def pair_reuse(old: Placement, worker: str, new: ParallelConfig, pos: Position,
               inherits: tuple[int | None, ...], tokens: dict[int, int]) -> int:
    """Bytes a worker already holds of a new position, from unit sets (independent of the mapper)."""
    was = old.position_of(worker)
    if was is None:
        return 0
    held = position_units(ALGEBRA, old.config, was, was.replica, tokens.get(was.replica, 0))
    batch = inherits[pos.replica]
    want = position_units(ALGEBRA, new, pos, -1 if batch is None else batch,
                          tokens.get(batch, 0) if batch is not None else 0)
    return unit_bytes(ALGEBRA, held & want, tokens)


@FAST
@given(scenarios())
def test_one_level_mapping_is_optimal_against_brute_force(case) -> None:
    workers, old, new, tokens = case
    result = DeviceMapper(MODEL).map(workers, old, new, tokens)
    positions = list(new.positions())
    reuse = [[pair_reuse(old, w.name, new, p, result.inherits, tokens) for p in positions]
             for w in workers]
    best = max(sum(reuse[w][j] for j, w in enumerate(choice))
               for choice in itertools.permutations(range(len(workers)), len(positions)))
    assert result.reused_bytes == best
    got = sum(reuse[[w.name for w in workers].index(result.placement.worker_at(p))][j]
              for j, p in enumerate(positions))
    assert got == best
    assert set(result.idle) | set(result.placement.workers) == {w.name for w in workers}


@FAST
@given(scenarios(group=2))
def test_two_level_mapping_is_optimal_among_instance_preserving_maps(case) -> None:
    workers, old, new, tokens = case
    result = DeviceMapper(MODEL).map(workers, old, new, tokens)
    positions = list(new.positions())
    reuse = [[pair_reuse(old, w.name, new, p, result.inherits, tokens) for p in positions]
             for w in workers]
    slots = [list(range(s, min(s + 2, len(positions)))) for s in range(0, len(positions), 2)]
    instances = [[i, i + 1] for i in range(0, len(workers), 2)]

    def pair(inst: list[int], slot: list[int]) -> int:
        return max(sum(reuse[d][j] for d, j in zip(perm, slot)) for perm in itertools.permutations(inst))

    best = max(sum(pair(instances[i], slots[s]) for s, i in enumerate(choice))
               for choice in itertools.permutations(range(len(instances)), len(slots)))
    assert result.reused_bytes == best
    instance_of = {w.name: w.instance_id for w in workers}
    for slot in slots:  # every slot (so every tensor group of M <= 2) sits on one instance
        assert len({instance_of[result.placement.worker_at(positions[j])] for j in slot}) == 1


@FAST
@given(d=st.integers(1, 3), p=st.integers(1, 4), m=st.sampled_from([1, 2, 4]),
       group=st.sampled_from([1, 2, 4]), with_kv=st.booleans(), spare=st.integers(0, 3))
def test_identical_configurations_map_every_worker_to_its_position(
        d: int, p: int, m: int, group: int, with_kv: bool, spare: int) -> None:
    config = ParallelConfig(d, p, m, 1)
    total = config.num_positions + spare * group
    total += -total % group
    workers = [Worker(f"w{i}", f"i{i // group}") for i in range(total)]
    old = Placement(config, tuple(w.name for w in workers[:config.num_positions]))
    tokens = {r: 7 * (r + 1) for r in range(d)} if with_kv else {}
    result = DeviceMapper(MODEL).map(list(reversed(workers)), old, config, tokens)
    assert result.placement == old
    assert result.reused_weight_bytes == sum(
        ALGEBRA.weight_bytes(config, pos.stage, pos.rank) for pos in config.positions())


def test_identity_holds_for_a_real_model_at_scale() -> None:
    spec = DESCRIBED_MODELS["gpt-20b"]
    config = ParallelConfig(10, 3, 4, 4)
    workers = [Worker(f"w{i}", f"i{i // 4}") for i in range(124)]
    old = Placement(config, tuple(w.name for w in workers[:120]))
    result = DeviceMapper(spec).map(workers[::-1], old, config, {r: 2000 + r for r in range(10)})
    assert result.placement == old


def test_shrinking_keeps_the_replicas_with_most_progress() -> None:
    assert inherit_replicas(3, 2, {0: 10, 1: 50, 2: 30}) == (1, 2)
    assert inherit_replicas(2, 3, {0: 1, 1: 2}) == (0, 1, None)
    assert inherit_replicas(3, 3) == (0, 1, 2)
    old_config, new_config = ParallelConfig(3, 2, 1, 1), ParallelConfig(2, 2, 1, 1)
    workers = [Worker(f"w{i}") for i in range(6)]
    old = Placement(old_config, tuple(w.name for w in workers))
    tokens = {0: 10, 1: 50, 2: 30}
    result = DeviceMapper(MODEL).map(workers, old, new_config, tokens, progress=tokens)
    assert result.inherits == (1, 2)
    # the workers of old replicas 1 and 2 carry their batches' KV along: all of it is reused
    assert result.placement.workers == ("w2", "w3", "w4", "w5")
    assert result.reused_kv_bytes == (50 + 30) * MODEL.kv_bytes_per_token
    assert set(result.idle) == {"w0", "w1"}


def test_newcomers_fill_new_positions_when_the_shape_changes() -> None:
    old_config, new_config = ParallelConfig(1, 2, 1, 1), ParallelConfig(1, 2, 2, 1)
    survivors = [Worker("a"), Worker("b")]
    old = Placement(old_config, ("a", "b"))
    result = DeviceMapper(MODEL).map(survivors + [Worker("c"), Worker("d")], old, new_config, {})
    # each survivor stays on its own stage at rank 0 (more LM-head rows on the last stage; a tie
    # on stage 0 that the stay-in-place bonus breaks)
    assert result.placement.worker_at(Position(0, 0, 0)) == "a"
    assert result.placement.worker_at(Position(0, 1, 0)) == "b"
