"""`make_scheduler`: one name means one policy everywhere (pure, milliseconds)."""

from __future__ import annotations

import pytest

from elastic_llm.scheduling.las import GuardedLAS, LASConfig
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig

from elastic_llm.scheduling import (
    DEFAULT_PREFILL_PREDICTOR,
    FCFS,
    SCHEDULER_NAMES,
    BatchLimits,
    LinearPrefillPredictor,
    MLFQConfig,
    SkipJoinMLFQ,
    make_scheduler,
    scheduler_name,
)


def test_names_build_their_policies_and_read_back() -> None:
    assert SCHEDULER_NAMES == ("fcfs", "mlfq", "skip-join", "las-guard", "las-adaptive", "las-predicted")
    assert isinstance(make_scheduler("las-guard"), GuardedLAS)
    assert not isinstance(make_scheduler("las-guard"), AdaptiveLAS)
    assert isinstance(make_scheduler("las-adaptive"), AdaptiveLAS)
    assert isinstance(make_scheduler("fcfs"), FCFS)
    plain, skip = make_scheduler("mlfq"), make_scheduler("skip-join")
    assert isinstance(plain, SkipJoinMLFQ) and plain.config.skip_join is False
    assert isinstance(skip, SkipJoinMLFQ) and skip.config.skip_join is True
    assert [scheduler_name(make_scheduler(n)) for n in SCHEDULER_NAMES] == list(SCHEDULER_NAMES)


def test_skip_join_places_by_predicted_prefill_and_plain_mlfq_does_not() -> None:
    config = MLFQConfig(base_quantum_s=0.01)
    predictor = LinearPrefillPredictor(0.0, 0.001)  # 1 ms per prompt token
    skip = make_scheduler("skip-join", config, predictor)
    plain = make_scheduler("mlfq", config)
    for scheduler in (skip, plain):
        scheduler.add_request("short", 5, now=0.0)  # 5 ms: level 0
        scheduler.add_request("long", 70, now=0.0)  # 70 ms: level 3 (quantum 80 ms)
    assert isinstance(skip, SkipJoinMLFQ) and isinstance(plain, SkipJoinMLFQ)
    assert (skip.state("short").level, skip.state("long").level) == (0, 3)
    assert (plain.state("short").level, plain.state("long").level) == (0, 0)
    # the name decides skip_join, whatever the settings say; the other settings are kept
    forced = make_scheduler("mlfq", MLFQConfig(base_quantum_s=0.5, skip_join=True))
    assert isinstance(forced, SkipJoinMLFQ)
    assert forced.config == MLFQConfig(base_quantum_s=0.5, skip_join=False)


def test_skip_join_without_a_predictor_uses_the_measured_default() -> None:
    scheduler = make_scheduler("skip-join")
    scheduler.add_request("r", 100, now=0.0)
    assert isinstance(scheduler, SkipJoinMLFQ)
    expected = MLFQConfig().join_level(DEFAULT_PREFILL_PREDICTOR(100))
    assert expected > 0 and scheduler.state("r").level == expected
    assert scheduler.schedule(0.0, BatchLimits()).scheduled[0].request_id == "r"


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("skipjoin", {}, "choose one of 'fcfs', 'mlfq', 'skip-join', 'las-guard', 'las-adaptive', 'las-predicted'"),
    ("las-guard", {"las": AdaptiveLASConfig()}, "use 'las-adaptive'"),
    ("las-adaptive", {"mlfq": MLFQConfig()}, "takes no MLFQ settings"),
    ("skip-join", {"las": LASConfig()}, "takes no LAS settings"),
    ("las-guard", {"mlfq": MLFQConfig()}, "takes no MLFQ settings"),
    ("fcfs", {"mlfq": MLFQConfig()}, "takes no MLFQ settings"),
    ("fcfs", {"predict_prefill_s": DEFAULT_PREFILL_PREDICTOR}, "takes no prefill predictor"),
    ("mlfq", {"predict_prefill_s": DEFAULT_PREFILL_PREDICTOR}, "takes no prefill predictor"),
])
def test_unknown_names_and_ignored_settings_are_refused(name: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_scheduler(name, **kwargs)  # type: ignore[arg-type]


def test_las_adaptive_keeps_the_fields_of_a_plain_las_config() -> None:
    scheduler = make_scheduler("las-adaptive", las=LASConfig(prior_lengths=(4, 8), max_guard_s=7.0))
    assert isinstance(scheduler, AdaptiveLAS)
    assert scheduler.config == AdaptiveLASConfig(prior_lengths=(4, 8), max_guard_s=7.0)
