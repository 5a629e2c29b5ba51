"""`ttft_p99_floor`: a TTFT P99 no schedule beats (pure, milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from elastic_llm.scheduling import FCFS, BatchLimits, GuardedLAS, LASConfig, WorkloadItem, make_workload
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig
from elastic_llm.sim import IterationTimeModel, simulate
from elastic_llm.sim.ttft_floor import prefill_work_s, ttft_p99_floor

MODEL = IterationTimeModel(0.05, 0.009, 0.0029)


def test_a_lone_request_on_an_idle_engine_meets_the_floor_exactly() -> None:
    items = [WorkloadItem(1.0, 100, 3)]
    (timing,) = simulate(FCFS(), items, MODEL, BatchLimits(max_batch_size=4, max_batch_tokens=512))
    assert ttft_p99_floor(items, MODEL, 512) == pytest.approx(timing.time_to_first_token_s)
    assert timing.time_to_first_token_s == pytest.approx(0.05 + 0.009 + 0.29)


def test_prefill_work_counts_the_iterations_the_token_budget_forces() -> None:
    assert prefill_work_s(1000, 1, MODEL, 512) == pytest.approx(2 * 0.05 + 2 * 0.009 + 2.9)
    assert prefill_work_s(40, 10, MODEL, 512) == pytest.approx(0.05 + 10 * 0.009 + 40 * 0.0029)
    with pytest.raises(ValueError):
        prefill_work_s(3, 4, MODEL, 512)


def test_a_simultaneous_burst_bounds_its_last_served() -> None:
    """100 requests of 10 tokens at once. P99 (numpy's interpolation) is at least the 99th smallest
    TTFT, and the 99th served needs 99 prefills (990 tokens: 2 iterations)."""
    items = [WorkloadItem(0.0, 10, 1) for _ in range(100)]
    floor = ttft_p99_floor(items, MODEL, 512)
    assert floor == pytest.approx(2 * 0.05 + 99 * 0.009 + 990 * 0.0029)
    timings = simulate(FCFS(), items, MODEL, BatchLimits(max_batch_size=100, max_batch_tokens=512))
    assert np.percentile([t.time_to_first_token_s for t in timings], 99) >= floor


@pytest.mark.parametrize("batch", [4, 32])
def test_no_policy_beats_the_floor_on_bursty_load(batch: int) -> None:
    items = [WorkloadItem(i.arrival_s, max(4, round(i.prompt_tokens * 0.15)), max(4, round(i.output_tokens * 0.15)))
             for i in make_workload(160, 3.0, "lognormal-cv3", cv=8.0, seed=5)]
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    floor = ttft_p99_floor(items, MODEL, 512)
    assert floor > 0.05 + 0.009
    for scheduler in (FCFS(), GuardedLAS(LASConfig()), AdaptiveLAS(AdaptiveLASConfig(first_token_slots=8.0)),
                      AdaptiveLAS(AdaptiveLASConfig(first_tokens_alone_at=1e-9))):
        timings = simulate(scheduler, items, MODEL, limits)
        assert np.percentile([t.time_to_first_token_s for t in timings], 99) >= floor - 1e-9


@pytest.mark.parametrize("kwargs", [{"workload": []}, {"quantile": 1.5}])
def test_bad_input_is_refused(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"workload": [WorkloadItem(0.0, 4, 1)], "model": MODEL, "max_batch_tokens": 512}
    with pytest.raises(ValueError):
        ttft_p99_floor(**{**arguments, **kwargs})  # type: ignore[arg-type]
