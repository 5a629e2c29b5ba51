"""Configuration optimizer against exhaustive search; rate, switch cost and cost-aware mode."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_llm.model.spec import DESCRIBED_MODELS
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import CostModel
from elastic_llm.planning.errors import NoFeasibleConfigError
from elastic_llm.planning.optimizer import (
    ConfigOptimizer,
    Market,
    SearchSpace,
    SwitchCost,
    spotserve_pipeline_degrees,
)
from elastic_llm.planning.profiles import T4, AnalyticProfile, DeviceSpec, Link, analytic_profile

from .helpers import FAST, tiny_model

G4DN = analytic_profile("g4dn.12xlarge")
WORK = Workload(512, 128)


def tiny_cost_model(memory: int, devices_per_instance: int = 2) -> CostModel:
    """The tiny model on a made-up device small enough for memory to constrain the choice."""
    device = DeviceSpec("toy", fp32_flops=1e9, fp16_flops=1e9, memory_bandwidth=1e8,
                        memory_bytes=memory, usable_memory_fraction=1.0)
    profile = AnalyticProfile("toy", device, devices_per_instance, Link(1e8, 1e-5), Link(1e7, 1e-4))
    return CostModel(tiny_model(), profile, Workload(input_len=32, output_len=8))


def brute_force(model: CostModel, space: SearchSpace, instances: int, rate: float,
                switch: SwitchCost | None = None) -> tuple[bool, float, float] | None:
    """Best (meets rate, latency score, throughput score) over every configuration, no pruning."""
    devices = instances * model.profile.devices_per_instance
    tensors = space.tensor_degrees or model.profile.tensor_degrees()
    pipelines = space.pipeline_degrees or range(1, model.model.num_layers + 1)
    best = None
    for p, m, b, m1, m2 in itertools.product(pipelines, tensors, space.batch_sizes,
                                             space.micro_batches, space.micro_batches):
        if p * m > devices or b % m1 or b % m2 or p > model.model.num_layers:
            continue
        config = ParallelConfig(devices // (p * m), p, m, b, m1, m2)
        if not model.fits(config):
            continue
        e = model.estimate(config)
        f = 0.0
        if switch and config.shape != switch.current.shape:
            f = min(1.0, switch.seconds / switch.horizon_seconds)
        lat, thr = e.latency + f * (e.latency + (switch.seconds / 2 if switch else 0)), e.throughput * (1 - f)
        meets = e.throughput >= rate
        key = (0, lat, -thr) if meets else (1, -thr, lat)
        if best is None or key < best[0]:
            best = (key, (meets, lat, thr))
    return None if best is None else best[1]


def assert_same_optimum(model: CostModel, space: SearchSpace, instances: int, rate: float,
                        switch: SwitchCost | None = None) -> None:
    expected = brute_force(model, space, instances, rate, switch)
    if expected is None:
        with pytest.raises(NoFeasibleConfigError):
            ConfigOptimizer(model, space).choose(instances, rate, switch)
        return
    got = ConfigOptimizer(model, space).choose(instances, rate, switch)
    assert got.meets_rate == expected[0]
    if got.meets_rate:
        assert got.score_latency == pytest.approx(expected[1], rel=1e-12)
    else:
        assert got.score_throughput == pytest.approx(expected[2], rel=1e-12)


@FAST
@given(memory=st.integers(20_000, 400_000), instances=st.integers(1, 6),
       rate=st.sampled_from([0.0, 0.01, 0.1, 1.0, 10.0, 1e6]))
def test_optimizer_equals_exhaustive_search_tiny(memory: int, instances: int, rate: float) -> None:
    assert_same_optimum(tiny_cost_model(memory), SearchSpace(), instances, rate)


@pytest.mark.parametrize(("instances", "rate"), [(3, 0.35), (8, 0.35), (9, 0.0), (10, 5.0)])
def test_optimizer_equals_exhaustive_search_20b(instances: int, rate: float) -> None:
    model = CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, WORK)
    assert_same_optimum(model, SearchSpace(batch_sizes=(1, 4, 8)), instances, rate)


@FAST
@given(instances=st.integers(1, 6), rate=st.floats(0.0, 3.0), seconds=st.floats(0.0, 50.0),
       p=st.integers(1, 4), m=st.sampled_from([1, 2, 4]))
def test_optimizer_equals_exhaustive_search_with_switch_cost(instances: int, rate: float,
                                                             seconds: float, p: int, m: int) -> None:
    switch = SwitchCost(ParallelConfig(1, p, m, 1), seconds, horizon_seconds=100.0)
    assert_same_optimum(tiny_cost_model(150_000), SearchSpace(), instances, rate, switch)


@FAST
@given(memory=st.integers(20_000, 400_000), instances=st.integers(1, 6), rate=st.floats(0.0, 50.0))
def test_rate_is_met_whenever_some_configuration_can(memory: int, instances: int, rate: float) -> None:
    model = tiny_cost_model(memory)
    optimizer = ConfigOptimizer(model)
    feasible = [e for e in optimizer.candidates(instances * 2)]
    if not feasible:
        return
    choice = optimizer.choose(instances, rate)
    assert choice.meets_rate == any(e.throughput >= rate for e in feasible)
    if not choice.meets_rate:
        assert choice.estimate.throughput == max(e.throughput for e in feasible)


def test_switch_cost_keeps_a_marginally_worse_running_shape() -> None:
    space = SearchSpace(batch_sizes=(4,), pipeline_degrees=spotserve_pipeline_degrees(44))
    optimizer = ConfigOptimizer(CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, WORK), space)
    free = optimizer.choose(9, 0.35)
    running = ParallelConfig(3, 3, 4, 4)
    assert free.config.shape != running.shape  # (4, 4) is a little faster than (3, 4) ...
    cheap = optimizer.choose(9, 0.35, SwitchCost(running, seconds=0.0, horizon_seconds=600))
    assert cheap.config.shape == free.config.shape
    costly = optimizer.choose(9, 0.35, SwitchCost(running, seconds=60.0, horizon_seconds=600))
    assert costly.config.shape == running.shape  # ... but not worth a 60 s migration
    assert costly.estimate.latency > free.estimate.latency


G4DN_MARKET = dict(spot_price=1.9046, on_demand_price=3.912)


@FAST
@given(spot=st.integers(0, 8), rate=st.floats(0.0, 1.2), max_od=st.integers(0, 6))
def test_cost_aware_mode_adds_the_fewest_on_demand(spot: int, rate: float, max_od: int) -> None:
    space = SearchSpace(batch_sizes=(4,), pipeline_degrees=spotserve_pipeline_degrees(44))
    optimizer = ConfigOptimizer(CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, WORK), space)
    market = Market(max_on_demand=max_od, **G4DN_MARKET)
    choices = {}
    for extra in range(max_od + 1):
        try:
            choices[extra] = optimizer.choose(spot + extra, rate)
        except NoFeasibleConfigError:
            pass
    if not choices:
        with pytest.raises(NoFeasibleConfigError):
            optimizer.choose_fleet(spot, rate, market)
        return
    got = optimizer.choose_fleet(spot, rate, market)
    meeting = [n for n, c in choices.items() if c.meets_rate]
    if meeting:
        assert got.on_demand == min(meeting) and got.meets_rate
    else:
        top = max(c.estimate.throughput for c in choices.values())
        assert got.on_demand == min(n for n, c in choices.items() if c.estimate.throughput == top)
    assert got.hourly_cost == pytest.approx(spot * 1.9046 + got.on_demand * 3.912)


def test_cost_aware_mode_never_pays_for_on_demand_when_spot_suffices() -> None:
    optimizer = ConfigOptimizer(CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, WORK),
                                SearchSpace(batch_sizes=(4,)))
    market = Market(max_on_demand=4, **G4DN_MARKET)
    assert optimizer.choose(8, 0.35).meets_rate
    for spot in (8, 9, 10):
        choice = optimizer.choose_fleet(spot, 0.35, market)
        assert choice.on_demand == 0 and choice.meets_rate
    # with 3 spot instances (12 T4s: one replica) the rate needs on-demand help
    short = optimizer.choose_fleet(3, 0.35, market)
    assert short.meets_rate and short.on_demand > 0
    assert not optimizer.choose(3 + short.on_demand - 1, 0.35).meets_rate


def test_no_feasible_configuration_raises() -> None:
    optimizer = ConfigOptimizer(CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, WORK))
    with pytest.raises(NoFeasibleConfigError):
        optimizer.choose(1, 0.35)  # 4 T4s cannot hold 80 GB of fp32 weights


def test_t4_profile_exposes_powers_of_two() -> None:
    assert G4DN.tensor_degrees() == (1, 2, 4, 8)
    assert T4.flops(2) > T4.flops(4)
