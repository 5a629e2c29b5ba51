"""The scheduling simulator: exact timings on hand-built cases, and the policies behave as claimed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_llm.scheduling import FCFS, BatchLimits, MLFQConfig, SkipJoinMLFQ, WorkloadItem
from elastic_llm.sim import IterationTimeModel, ShortestRemainingFirst, simulate

UNIT = IterationTimeModel(fixed_s=1.0, per_request_s=0.0, per_token_s=0.0)  # 1 s per iteration


def test_fcfs_timings_are_exact_on_a_hand_built_case() -> None:
    # batch of 1: r0 (3 tokens) runs 0-3 s; r1 arrives at 0.5 and runs 3-5 s; r2 arrives at 10.
    workload = [WorkloadItem(0.0, 4, 3), WorkloadItem(0.5, 4, 2), WorkloadItem(10.0, 4, 1)]
    timings = simulate(FCFS(), workload, UNIT, BatchLimits(max_batch_size=1))
    assert [(t.first_token_s, t.finish_s) for t in timings] == [(1.0, 3.0), (4.0, 5.0), (11.0, 11.0)]
    assert [t.completion_time_s for t in timings] == [3.0, 4.5, 1.0]
    assert [t.output_tokens for t in timings] == [3, 2, 1]


def test_chunked_prefill_samples_only_when_the_prompt_is_done() -> None:
    # token budget 4: a 10-token prompt takes 3 iterations (4 + 4 + 2), sampling in the third.
    timings = simulate(FCFS(), [WorkloadItem(0.0, 10, 2)], UNIT, BatchLimits(1, max_batch_tokens=4))
    assert timings[0].first_token_s == 3.0 and timings[0].finish_s == 4.0


def test_iteration_time_model_counts_requests_and_tokens() -> None:
    model = IterationTimeModel(fixed_s=0.05, per_request_s=0.01, per_token_s=0.002)
    assert model(4, 4) == pytest.approx(0.05 + 0.04 + 0.008)
    assert model(1, 100) == pytest.approx(0.05 + 0.01 + 0.2)
    with pytest.raises(ValueError):
        IterationTimeModel(-1.0, 0.0, 0.0)


def test_mlfq_lets_a_short_request_overtake_a_long_one_and_fcfs_does_not() -> None:
    workload = [WorkloadItem(0.0, 4, 50), WorkloadItem(1.5, 4, 2)]
    limits = BatchLimits(max_batch_size=1)
    fcfs = simulate(FCFS(), workload, UNIT, limits)
    mlfq = simulate(SkipJoinMLFQ(MLFQConfig(base_quantum_s=1.0, skip_join=False)), workload, UNIT, limits)
    assert fcfs[1].finish_s == 52.0  # waits for all 50 tokens of the long request
    assert mlfq[1].finish_s < 6.0
    assert mlfq[0].preemptions >= 1 and fcfs[0].preemptions == 0
    assert mlfq[0].finish_s == 52.0  # work-conserving: the long one ends at the same time


def test_oracle_runs_shortest_remaining_first() -> None:
    workload = [WorkloadItem(0.0, 4, 10), WorkloadItem(0.0, 4, 3), WorkloadItem(0.0, 4, 6)]
    oracle = ShortestRemainingFirst({"r0": 10, "r1": 3, "r2": 6})
    timings = simulate(oracle, workload, UNIT, BatchLimits(max_batch_size=1))
    assert [t.finish_s for t in timings] == [19.0, 3.0, 9.0]


def test_the_simulator_is_policy_layer_only() -> None:
    code = ("import sys, elastic_llm.sim; "
            "bad = [m for m in ('torch', 'dask', 'distributed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
