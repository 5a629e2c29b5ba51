"""`ReplicaOptions` validation and the `SchedulingCounters` contract (pure, milliseconds)."""

from __future__ import annotations

import pickle

import pytest

from elastic_llm.control.messages import LoopCounters, ReplicaCommit, SchedulingCounters
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.control.fleet import LoopStats
from elastic_llm.scheduling import (
    GuardedLAS,
    LASConfig,
    LinearPrefillPredictor,
    MLFQConfig,
    ResidencyConfig,
    SkipJoinMLFQ,
)

SWAP = ResidencyConfig(device_budget_bytes=2**20, mode="swap")


def test_skip_join_with_a_kv_budget_builds_and_pickles() -> None:
    options = ReplicaOptions(model="m", scheduler="skip-join", mlfq=MLFQConfig(base_quantum_s=0.05),
                             prefill_predictor=LinearPrefillPredictor(0.0, 0.001), kv_residency=SWAP)
    scheduler = options.build_scheduler()
    assert isinstance(scheduler, SkipJoinMLFQ)
    assert scheduler.config.skip_join and scheduler.config.base_quantum_s == 0.05
    assert options.build_scheduler() is not scheduler  # every engine gets its own
    copy = pickle.loads(pickle.dumps(options))  # how the options reach the workers
    assert copy == options and copy.kv_residency == SWAP
    recompute = ReplicaOptions(model="m", scheduler="mlfq",
                               kv_residency=ResidencyConfig(device_budget_bytes=2**20, mode="recompute"))
    scheduler = recompute.build_scheduler()
    assert isinstance(scheduler, SkipJoinMLFQ) and not scheduler.config.skip_join


def test_las_guard_builds_with_its_settings_and_pickles() -> None:
    options = ReplicaOptions(model="m", scheduler="las-guard", las=LASConfig(prior_lengths=(4, 8, 16)))
    scheduler = options.build_scheduler()
    assert isinstance(scheduler, GuardedLAS) and scheduler.config.prior_lengths == (4, 8, 16)
    assert pickle.loads(pickle.dumps(options)) == options


def test_las_adaptive_builds_with_its_settings_and_pickles() -> None:
    from elastic_llm.scheduling import AdaptiveLAS, AdaptiveLASConfig

    las = AdaptiveLASConfig(prior_lengths=(4, 8, 16), first_token_slots=0.5)
    options = ReplicaOptions(model="m", scheduler="las-adaptive", las=las)
    scheduler = options.build_scheduler()
    assert isinstance(scheduler, AdaptiveLAS) and scheduler.config == las
    assert pickle.loads(pickle.dumps(options)) == options


def test_las_predicted_builds_with_its_predictor_and_pickles() -> None:
    from elastic_llm.scheduling import PredictedLAS, PromptLengthPredictor

    predictor = PromptLengthPredictor.fit([[1, 2], [3, 4], [1, 5], [3, 6]] * 3, [2, 40, 3, 50] * 3, classes=2)
    options = ReplicaOptions(model="m", scheduler="las-predicted", length_predictor=predictor)
    scheduler = options.build_scheduler()
    assert isinstance(scheduler, PredictedLAS) and scheduler.predictor == predictor
    assert pickle.loads(pickle.dumps(options)) == options
    with pytest.raises(ClusterConfigError, match="only 'las-predicted'"):
        ReplicaOptions(model="m", scheduler="las-adaptive", length_predictor=predictor)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scheduler": "lifo"}, r"unknown scheduler 'lifo': choose one of 'fcfs', 'mlfq', 'skip-join', 'las-guard', 'las-adaptive', 'las-predicted'"),
    ({"scheduler": "skip-join", "las": LASConfig()}, "takes no LAS settings"),
    ({"scheduler": "las-guard", "kv_residency": SWAP}, r"kv_residency with scheduler='las-guard'"),
    ({"scheduler": "fcfs", "kv_residency": SWAP},
     r"kv_residency with scheduler='fcfs'.*estimates next scheduled.*\['mlfq', 'skip-join'\]"),
    ({"scheduler": "skip-join", "kv_residency": SWAP, "parallel": (1, 2)}, "whole-model replica"),
    ({"scheduler": "skip-join", "kv_residency": SWAP, "parallel": "auto"}, "whole-model replica"),
    ({"scheduler": "skip-join", "kv_residency": ResidencyConfig(device_budget_bytes=0)},
     "device_budget_bytes must be > 0"),
    ({"scheduler": "skip-join", "kv_residency": SWAP, "memory_budget_bytes": 2**19},
     "exceeds memory_budget_bytes"),
    ({"scheduler": "fcfs", "mlfq": MLFQConfig()}, "takes no MLFQ settings"),
    ({"scheduler": "mlfq", "prefill_predictor": LinearPrefillPredictor(0.0, 0.001)},
     "takes no prefill predictor"),
    ({"max_batch_tokens": 0}, "max_batch_tokens must be >= 1"),
])
def test_bad_settings_fail_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ClusterConfigError, match=match):
        ReplicaOptions(model="m", **kwargs)  # type: ignore[arg-type]


def test_scheduling_counters_sum_travel_and_reach_the_loop_stats() -> None:
    first = SchedulingCounters(preemptions=3, bytes_swapped_out=100, bytes_swapped_in=60,
                               swap_seconds=0.5, tokens_dropped=0)
    second = SchedulingCounters(preemptions=2, bytes_swapped_out=10, bytes_swapped_in=40,
                                swap_seconds=0.25, tokens_dropped=7)
    assert first.plus(second) == SchedulingCounters(5, 110, 100, 0.75, 7)
    wire = first.to_dict()
    assert wire == {"preemptions": 3, "bytes_swapped_out": 100, "bytes_swapped_in": 60,
                    "swap_seconds": 0.5, "tokens_dropped": 0}
    assert SchedulingCounters.from_dict({**wire, "newer_field": 1}) == first
    commit = ReplicaCommit("r0", LoopCounters(4, 1.0, 0.1, 1.2, 0, first))
    assert ReplicaCommit.from_wire(commit.to_wire()) == commit  # the typed commit carries them
    loops = LoopStats()
    assert loops.of("r0").scheduling == SchedulingCounters()
    loops.record("r0", commit.loop)
    loops.record("r0", LoopCounters(5, 1.1, 0.1, 1.3, 0, second))  # cumulative: the latest message wins
    assert loops.of("r0").scheduling == second and loops.of("r1").scheduling == SchedulingCounters()
    assert loops.scheduling_total() == second
