"""Communication between real gloo processes, and the engine comparison, on small shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.profiling import CommProfilingError, ProfileSettings, profile_model
from elastic_llm.profiling.comm import CommJob, measure_group

JOB = CommJob(world=2, rows=(1, 16), hidden=64, hop=True, repeats=3, warmup=1, threads=1,
              timeout=30)


@pytest.mark.timeout(120)
def test_two_gloo_processes_time_all_reduce_and_hop() -> None:
    times = measure_group(JOB)
    assert set(times.all_reduce) == set(times.hop) == {1, 16}
    for value in (*times.all_reduce.values(), *times.hop.values()):
        assert math.isfinite(value) and 0 < value < 30


@pytest.mark.timeout(120)
def test_a_failing_worker_is_reported_not_waited_for() -> None:
    from dataclasses import replace

    with pytest.raises(CommProfilingError, match="rank"):
        measure_group(replace(JOB, rows=(-1,)))  # torch.zeros(-1, 64) raises in every worker
    with pytest.raises(CommProfilingError):
        measure_group(replace(JOB, world=1))


def test_engine_comparison_gives_a_finite_ratio(tiny_checkpoint: Callable[[str], Path]) -> None:
    from elastic_llm.profiling.engine_check import compare_decode_step

    path = tiny_checkpoint("llama-gqa-untied")
    settings = ProfileSettings(tensor_degrees=(1,), batch_sizes=(1, 2), prefill_len=8,
                               context_len=8, repeats=1, measure_comm=False, flush_cache=False)
    profile = MeasuredProfile.from_json(profile_model(path, settings).to_json_dict())
    profiled_layer = dict(profile.to_dict()["layer"]["decode"]["1"])
    checks = compare_decode_step(path, profile, (1, 2), context_len=8, steps=2, flush_cache=False)
    assert [c.batch for c in checks] == [1, 2]
    for check in checks:
        assert check.measured > 0 and check.predicted > 0 and check.predicted_same_time > 0
        assert math.isfinite(check.ratio) and math.isfinite(check.ratio_same_time)
    # the written profile is not modified by the comparison
    assert profile.to_dict()["layer"]["decode"]["1"] == profiled_layer
