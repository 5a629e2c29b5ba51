"""`ShapePlanner`: the planning core's optimizer chooses sharded replicas' shapes (pure, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.control.shapes import (
    CPU_WORKER,
    ShapePlanner,
    cpu_profile,
    fit_shape,
    load_changed,
    with_memory_budget,
)
from elastic_llm.model.spec import described_model
from elastic_llm.planning.errors import NoFeasibleConfigError
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import AnalyticProfile, Link

PROFILE = Path(__file__).resolve().parents[2] / "docs" / "profiles" / "smollm2-cpu.json"
FAST = Link(bandwidth=1e12, latency=1e-9)


def test_a_memory_budget_below_the_model_forces_sharding() -> None:
    spec = described_model("opt-6.7b")  # 26.6 GB of fp32 weights
    planner = ShapePlanner(spec, cpu_profile(64 * 2**30), batch_size=4)
    # more load than any shape can serve: the most throughput, i.e. one worker per replica
    roomy = planner.choose(workers=4, memory_bytes=64 * 2**30, arrival_rate=1e6)
    assert roomy.devices_per_replica == 1 and roomy.D == 4
    tight = planner.choose(workers=4, memory_bytes=10 * 2**30, arrival_rate=1e6)
    assert tight.devices_per_replica >= 3  # 26.6 GB / 10 GB: at least three workers each
    assert tight.num_positions <= 4
    with pytest.raises(NoFeasibleConfigError):
        planner.choose(workers=2, memory_bytes=10 * 2**30)
    assert planner.fits(tight.shape, 10 * 2**30) and not planner.fits((1, 1), 10 * 2**30)


def test_the_running_shape_is_kept_when_switching_would_cost_more_than_it_gains() -> None:
    spec = described_model("opt-6.7b")
    planner = ShapePlanner(spec, AnalyticProfile("fast", CPU_WORKER, 1, FAST, FAST, 4), batch_size=4,
                           switch_seconds=1e6, horizon_s=1.0)
    free = planner.choose(workers=4, memory_bytes=64 * 2**30)
    kept = planner.choose(workers=4, memory_bytes=64 * 2**30, current=(1, 1))
    assert free.shape != (1, 1) and kept.shape == (1, 1)


def test_the_memory_budget_replaces_the_profiles_own() -> None:
    measured = MeasuredProfile.from_json(PROFILE)
    assert with_memory_budget(measured, 123).device_memory_bytes == 123
    assert with_memory_budget(cpu_profile(1), 456).device_memory_bytes == 456
    with pytest.raises(TypeError):
        with_memory_budget(object(), 1)  # type: ignore[arg-type]


def test_replica_options_accept_auto_and_refuse_nonsense() -> None:
    assert ReplicaOptions(model="m", parallel="auto").sharded
    assert not ReplicaOptions(model="m").sharded
    for bad in ("fast", (0, 1), (1, 2, 3)):
        with pytest.raises(ValueError):
            ReplicaOptions(model="m", parallel=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReplicaOptions(model="m", memory_budget_bytes=0)


def test_fit_shape_keeps_the_most_positions_and_prefers_the_tensor_degree() -> None:
    assert fit_shape((2, 1), 1) == (1, 1)
    assert fit_shape((2, 2), 3) == (3, 1)
    assert fit_shape((1, 2), 2) == (1, 2)
    assert fit_shape((2, 1), 4) == (4, 1)
    with pytest.raises(ValueError):
        fit_shape((1, 1), 0)


def test_load_changed_needs_a_2x_move_either_way_above_a_floor() -> None:
    assert not load_changed(None, 5.0)  # nothing planned yet
    assert load_changed(0.0, 0.67) and load_changed(1.0, 2.0) and load_changed(2.0, 1.0)
    assert not load_changed(1.0, 1.9) and not load_changed(1.0, 0.6)
    assert not load_changed(0.0, 0.01)  # both under the floor of one request a minute
