"""Slice algebra: AutoTP shard sizes, bytes per position, overlaps against unit-level sets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_llm.model.spec import DESCRIBED_MODELS
from elastic_llm.planning.config import ParallelConfig, Placement, Position, stage_layer_range
from elastic_llm.planning.errors import PlanningError
from elastic_llm.planning.slices import Part, SliceAlgebra, shard_sizes

from .helpers import FAST, position_units, smollm2, tiny_model, unit_bytes


def test_shard_sizes_match_deepspeed_autotp_for_smollm2() -> None:
    # Values printed by deepspeed.module_inject.tp_shard.get_shard_size_list (ANCHORS.md).
    spec = smollm2()
    q, kv, mlp = spec.q_size, spec.kv_size, spec.intermediate_size
    assert shard_sizes(q, 2, spec.num_kv_heads) == (384, 192)
    assert shard_sizes(kv, 2, spec.num_kv_heads) == (128, 64)
    assert shard_sizes(mlp, 2) == (768, 768)
    assert shard_sizes(q, 3, spec.num_kv_heads) == (192, 192, 192)
    assert shard_sizes(kv, 3, spec.num_kv_heads) == (64, 64, 64)
    assert shard_sizes(mlp, 3) == (512, 512, 512)
    assert shard_sizes(q, 4, spec.num_kv_heads) == (192, 192, 192, 0)
    assert shard_sizes(mlp, 4) == (384, 384, 384, 384)


@FAST
@given(total=st.integers(1, 5000), degree=st.integers(1, 16), groups=st.sampled_from([None, 1, 2, 3, 8]))
def test_shard_sizes_tile_the_dimension_front_loaded(total: int, degree: int, groups: int | None) -> None:
    sizes = shard_sizes(total, degree, groups)
    assert len(sizes) == degree and sum(sizes) == total and min(sizes) >= 0
    if groups and total % groups == 0:
        unit = total // groups
        assert all(s % unit == 0 for s in sizes)
        assert list(sizes) == sorted(sizes, reverse=True)  # first ranks get the extra head groups
    elif total >= 64:
        assert all(s % 64 == 0 for s in sizes[:-1])


def test_position_bytes_add_up_to_the_spec() -> None:
    spec = tiny_model(attention_bias=True)
    algebra = SliceAlgebra(spec)
    for m in (1, 2, 3, 4):
        config = ParallelConfig(1, 1, m, 1)
        held = sum(algebra.weight_bytes(config, 0, r) for r in range(m))
        # every rank holds the embedding and the norms whole; the untied head is sharded
        replicated = (spec.embedding_bytes + spec.num_layers * 2 * spec.hidden_size * 4
                      + spec.hidden_size * 4)
        assert held == spec.total_bytes + (m - 1) * replicated


def test_layers_split_evenly_front_loaded() -> None:
    assert [len(stage_layer_range(44, 3, s)) for s in range(3)] == [15, 15, 14]
    assert [len(stage_layer_range(10, 6, s)) for s in range(6)] == [2, 2, 2, 2, 1, 1]
    # with the head costing 8 layers (SmolLM2) the last stage takes fewer layers
    assert [len(stage_layer_range(30, 3, s, (0.0, 8.0))) for s in range(3)] == [13, 13, 4]
    assert [len(stage_layer_range(44, 6, s, (0.0, 0.68))) for s in range(6)] == [8, 8, 7, 7, 7, 7]
    for stages in range(1, 9):  # never worse than the even split on the busiest stage
        edges = (0.5, 3.0)
        cost = [len(stage_layer_range(24, stages, s, edges)) + (0.5 if s == 0 else 0)
                + (3.0 if s == stages - 1 else 0) for s in range(stages)]
        even = [len(stage_layer_range(24, stages, s)) + (0.5 if s == 0 else 0)
                + (3.0 if s == stages - 1 else 0) for s in range(stages)]
        assert max(cost) <= max(even) and sum(len(stage_layer_range(24, stages, s, edges))
                                              for s in range(stages)) == 24
    with pytest.raises(PlanningError):
        stage_layer_range(4, 5, 0)


configs = st.builds(lambda p, m: ParallelConfig(1, p, m, 1), st.integers(1, 4), st.integers(1, 4))


@FAST
@given(old=configs, new=configs, bias=st.booleans())
def test_overlap_matrices_equal_unit_set_intersections(old: ParallelConfig, new: ParallelConfig,
                                                       bias: bool) -> None:
    algebra = SliceAlgebra(tiny_model(attention_bias=bias))
    weights = algebra.weight_overlap(old, new)
    kv = algebra.kv_overlap_per_token(old, new)
    for a in old.positions():
        for b in new.positions():
            shared = position_units(algebra, old, a) & position_units(algebra, new, b)
            assert weights[a.stage * old.M + a.rank, b.stage * new.M + b.rank] == unit_bytes(
                algebra, shared, {})
            kv_shared = (position_units(algebra, old, a, 0, 1) & position_units(algebra, new, b, 0, 1))
            kv_only = {u for u in kv_shared if u[2] >= 0}
            assert kv[a.stage * old.M + a.rank, b.stage * new.M + b.rank] == unit_bytes(
                algebra, kv_only, {0: 1})


def test_kv_bytes_per_token_of_a_replica_sum_to_the_spec() -> None:
    spec = DESCRIBED_MODELS["gpt-20b"]
    algebra = SliceAlgebra(spec)
    config = ParallelConfig(1, 3, 4, 4)
    total = sum(algebra.kv_bytes_per_token(config, s, r) for s in range(3) for r in range(4))
    assert total == spec.kv_bytes_per_token


def test_placement_round_trips_and_rejects_duplicates() -> None:
    config = ParallelConfig(2, 2, 2, 1)
    names = tuple(f"w{i}" for i in range(8))
    placement = Placement(config, names)
    for index, (pos, worker) in enumerate(placement.items()):
        assert config.index_of(pos) == index and placement.worker_at(pos) == worker
        assert placement.position_of(worker) == pos
    assert placement.position_of("nobody") is None
    assert placement.worker_at(Position(1, 0, 1)) == "w5"
    with pytest.raises(PlanningError):
        Placement(config, names[:7] + ("w0",))
    with pytest.raises(PlanningError):
        ParallelConfig(1, 1, 1, 4, prefill_micro_batches=3)


def test_parts_cover_every_kind_once() -> None:
    algebra = SliceAlgebra(tiny_model())
    pieces = algebra.position_slices(ParallelConfig(1, 1, 1, 1), Position(0, 0, 0), 0, 5)
    assert {p.part for p in pieces} == set(Part)
