"""Cost model: calibration points, memory floors, SpotServe's published 20B latencies, formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from elastic_llm.model.spec import DESCRIBED_MODELS
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import SPOTSERVE_OVERHEAD, CostModel
from elastic_llm.planning.errors import ProfileError
from elastic_llm.planning.measured import FORMAT, MeasuredProfile
from elastic_llm.planning.optimizer import ConfigOptimizer, SearchSpace, spotserve_pipeline_degrees
from elastic_llm.planning.profiles import Phase, analytic_profile

from .helpers import tiny_model

SPOTSERVE = Workload(input_len=512, output_len=128, arrival_rate=0.35)
G4DN = analytic_profile("g4dn.12xlarge")


def test_t4_profile_reproduces_spotserve_calibration_points() -> None:
    # ANCHORS.md: 6.7B, M=4, batch 4: init 61.6 ms/layer, incr 1.02 ms/layer (the fitted points).
    spec = DESCRIBED_MODELS["opt-6.7b"]
    prefill = G4DN.layer_time(spec, Phase.PREFILL, 4, 4, SPOTSERVE).total
    decode = G4DN.layer_time(spec, Phase.DECODE, 4, 4, SPOTSERVE).total
    assert prefill == pytest.approx(61.6e-3, rel=0.02)
    assert decode == pytest.approx(1.02e-3, rel=0.02)


@pytest.mark.parametrize(("name", "prefill_ms", "decode_ms"),
                         [("opt-6.7b", 5.3, 0.07), ("gpt-20b", 7.0, 0.1), ("spotserve-30b", 8.0, 0.15)])
def test_stage_hops_near_spotserve_profile(name: str, prefill_ms: float, decode_ms: float) -> None:
    # Not fitted: derived from the 50 Gbps link alone. Prefill hops are bandwidth-bound (within
    # 25%); decode hops are latency-bound (within a factor of two).
    spec = DESCRIBED_MODELS[name]
    assert G4DN.stage_hop_time(spec, Phase.PREFILL, 4, SPOTSERVE) * 1e3 == pytest.approx(
        prefill_ms, rel=0.25)
    assert 0.5 <= G4DN.stage_hop_time(spec, Phase.DECODE, 4, SPOTSERVE) * 1e3 / decode_ms <= 2.0


@pytest.mark.parametrize(("name", "floor"), [("opt-6.7b", 4), ("gpt-20b", 12), ("spotserve-30b", 16)])
def test_memory_floors_match_spotserve(name: str, floor: int) -> None:
    spec = DESCRIBED_MODELS[name]
    model = CostModel(spec, G4DN, SPOTSERVE)
    fitting = [p * m for p in spotserve_pipeline_degrees(spec.num_layers) for m in (1, 2, 4, 8)
               if model.fits(ParallelConfig(1, p, m, 4))]
    assert min(fitting) == floor


def _static_batching_latency(rate: float, replicas: int, batch: int, service: float,
                             requests: int = 20000, seed: int = 0) -> float:
    """Mean end-to-end latency of Poisson arrivals served in static batches (FasterTransformer
    style: a free replica takes up to ``batch`` waiting requests and runs them for ``service`` s)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    free = np.zeros(replicas)
    i, total = 0, 0.0
    while i < requests:
        replica = int(np.argmin(free))
        start = max(free[replica], arrivals[i])
        j = i + 1
        while j < requests and j - i < batch and arrivals[j] <= start:
            j += 1
        free[replica] = start + service
        total += float(np.sum(start + service - arrivals[i:j]))
        i = j
    return total / requests


@pytest.mark.parametrize(("trace", "instances", "published"), [
    ("A_S", (7, 8, 10, 9, 10, 8), 23.5),
    ("B_S", (10, 8, 7, 8, 9), 23.3),
])
def test_20b_latency_within_25_percent_of_spotserve(trace: str, instances: tuple[int, ...],
                                                    published: float) -> None:
    """GPT-20B on g4dn.12xlarge (4 x T4), batch 4, prompt 512, 128 output tokens, 0.35 req/s.

    What we compare: SpotServe's published *average request latency* of each pure-spot trace
    (ANCHORS.md: A_S 23.5 s, B_S 23.3 s) against our prediction for the same setup: for every
    instance count the trace passes through, the optimizer's choice (SpotServe's search space: B = 4,
    P dividing the padded layer count) gives a service latency from the analytic T4 profile; the
    published averages are end to end, so we add the queueing that static batching at 0.35 req/s
    causes (Poisson arrivals, D replicas taking up to 4 waiting requests) and average over the
    trace's segments (their durations are not published). Why: the artifact's own optimizer choices
    and predicted latencies are not published, so the measured averages are the only 20B numbers
    to check against. The +O traces are left out: when their on-demand replacements join would be
    a guess. The pure service latency must also stay below every published average (four traces),
    since queueing and churn only add to it.
    """
    optimizer = ConfigOptimizer(
        CostModel(DESCRIBED_MODELS["gpt-20b"], G4DN, SPOTSERVE),
        SearchSpace(batch_sizes=(4,), pipeline_degrees=spotserve_pipeline_degrees(44)),
    )
    end_to_end = []
    for count in instances:
        choice = optimizer.choose(count, SPOTSERVE.arrival_rate)
        assert choice.meets_rate
        assert choice.estimate.latency < min(23.5, 23.3, 23.4, 20.7)
        end_to_end.append(_static_batching_latency(SPOTSERVE.arrival_rate, choice.config.D, 4,
                                                   choice.estimate.latency))
    assert float(np.mean(end_to_end)) == pytest.approx(published, rel=0.25)


def test_breakdown_follows_the_pipeline_formulas() -> None:
    spec = DESCRIBED_MODELS["gpt-20b"]
    model = CostModel(spec, G4DN, SPOTSERVE)
    config = ParallelConfig(2, 4, 4, 4, prefill_micro_batches=2, decode_micro_batches=1)
    estimate = model.estimate(config)
    layer = G4DN.layer_time(spec, Phase.PREFILL, 4, 2, SPOTSERVE)
    head = G4DN.head_time(spec, Phase.PREFILL, 4, 2, SPOTSERVE)
    hop = G4DN.stage_hop_time(spec, Phase.PREFILL, 2, SPOTSERVE)
    f = 11  # ceil(44 / 4)
    assert estimate.prefill.total == pytest.approx(layer.total * f * (4 + 2 - 1) + hop * 3 + head.total)
    assert estimate.prefill.pp_comm == pytest.approx(hop * 3)
    expected = (estimate.prefill.total + 128 * estimate.decode_step.total) * SPOTSERVE_OVERHEAD
    assert estimate.latency == pytest.approx(expected)
    assert estimate.throughput == pytest.approx(2 * 4 / estimate.latency)
    assert estimate.memory_bytes == estimate.weight_bytes + estimate.kv_bytes


def _profile_dict() -> dict:
    return {
        "format": FORMAT, "name": "test-cpu", "model": "tiny", "input_len": 100,
        "devices_per_instance": 1, "device_memory_bytes": 10**9, "network_bandwidth": 1e9,
        "layer": {"prefill": {"1": {"1": 0.010, "4": 0.040}, "2": {"1": 0.008, "2": 0.012}},
                  "decode": {"1": {"1": 0.001, "4": 0.002}, "2": {"1": 0.0012}}},
        "tp_comm": {"prefill": {"2": {"1": 0.002}}, "decode": {"2": {"1": 0.0004}}},
        "head": {"decode": {"1": {"1": 0.0005}}},
        "stage_hop": {"prefill": {"1": 0.003}, "decode": {"1": 0.0001}},
    }


def test_measured_profile_loads_from_path_and_dict(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile_dict()))
    from_file = MeasuredProfile.from_json(path)
    from_dict = MeasuredProfile.from_json(_profile_dict())
    spec = tiny_model()
    work = Workload(input_len=200, output_len=10)
    for profile in (from_file, from_dict):
        assert profile.tensor_degrees() == (1, 2)
        # interpolation at b=2 between 10 ms (b=1) and 40 ms (b=4), doubled for a 200-token prompt
        assert profile.layer_time(spec, Phase.PREFILL, 1, 2, work).total == pytest.approx(0.040)
        # above the largest measured b: extrapolate along the last two points (2 ms + 3 * 1/3 ms)
        assert profile.layer_time(spec, Phase.DECODE, 1, 7, work).total == pytest.approx(0.003)
        split = profile.layer_time(spec, Phase.DECODE, 2, 1, work)
        assert (split.compute, split.tp_comm) == pytest.approx((0.0008, 0.0004))
    assert from_file.to_dict() == _profile_dict()


def test_cost_model_runs_on_a_measured_profile() -> None:
    spec = tiny_model()
    work = Workload(input_len=100, output_len=10)
    model = CostModel(spec, MeasuredProfile.from_json(_profile_dict()), work, overhead=1.0)
    estimate = model.estimate(ParallelConfig(1, 2, 1, 1))
    # prefill: 2 layers/stage * 2 slots * 10 ms + 1 hop * 3 ms; decode: 2 * 2 * 1 ms + 0.1 + 0.5
    assert estimate.prefill.total == pytest.approx(0.043)
    assert estimate.decode_step.total == pytest.approx(0.0046)
    assert estimate.latency == pytest.approx(0.043 + 10 * 0.0046)


@pytest.mark.parametrize("change", [
    {"format": "other/1"},
    {"layer": {"prefill": {"1": {"1": -1.0}}, "decode": {"1": {"1": 0.1}}}},
    {"layer": {"prefill": {"1": {"1": 1.0}}, "decode": {"2": {"1": 0.1}}}},
    {"input_len": "many"},
])
def test_malformed_profiles_are_rejected(change: dict) -> None:
    with pytest.raises(ProfileError):
        MeasuredProfile.from_json({**_profile_dict(), **change})


def test_measured_profile_refuses_unmeasured_degree_and_other_model(tmp_path: Path) -> None:
    profile = MeasuredProfile.from_json(_profile_dict())
    with pytest.raises(ProfileError):
        profile.layer_time(tiny_model(), Phase.DECODE, 4, 1, Workload())
    with pytest.raises(ProfileError):
        profile.layer_time(DESCRIBED_MODELS["gpt-20b"], Phase.DECODE, 1, 1, Workload())
    with pytest.raises(ProfileError):
        MeasuredProfile.from_json(tmp_path / "missing.json")
