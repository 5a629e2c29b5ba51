"""GuardedLAS ("las-guard"): service in tokens, newcomers first, hysteresis, the age guard."""

from __future__ import annotations

from typing import Any

import pytest

from elastic_llm.scheduling import BatchLimits, IterationOutcome
from elastic_llm.scheduling.las import GuardedLAS, LASConfig
from tests.scheduling.fakes import FakeRequest, run

NO_GUARD = dict(min_guard_s=1e6, max_guard_s=1e6, use_gittins=False)


def _decode(scheduler: GuardedLAS, ids: list[str], now: float, duration: float = 0.1) -> None:
    """Report one iteration in which each of `ids` computed one token and sampled it."""
    scheduler.update(IterationOutcome(now, duration, {rid: 1 for rid in ids}, tuple(ids)))


def _ran(scheduler: GuardedLAS, now: float, limits: BatchLimits) -> list[str]:
    return [w.request_id for w in scheduler.schedule(now, limits).scheduled]


def test_levels_are_geometric_in_sampled_tokens() -> None:
    config = LASConfig(quantum_tokens=2)
    assert [config.level(a) for a in (0, 1, 2, 5, 6, 13, 14)] == [0, 0, 1, 1, 2, 2, 3]
    assert [config.level_start(level) for level in range(4)] == [0, 2, 6, 14]


def test_service_counts_sampled_tokens_not_iteration_seconds() -> None:
    scheduler = GuardedLAS(LASConfig(**NO_GUARD))
    scheduler.add_request("a", 4, 0.0)
    scheduler.schedule(0.0, BatchLimits())
    # a 5-second iteration that only prefilled part of "a"'s prompt: no token sampled, no service
    scheduler.update(IterationOutcome(5.0, 5.0, {"a": 2}, ()))
    assert scheduler.state("a").attained_tokens == 0 and scheduler.state("a").pending_tokens == 2
    scheduler.update(IterationOutcome(6.0, 1.0, {"a": 2}, ("a",)))
    assert scheduler.state("a").attained_tokens == 1 and scheduler.state("a").level == 1


def test_a_newcomer_preempts_the_least_served_running_request_and_fifo_holds_within_a_level() -> None:
    scheduler = GuardedLAS(LASConfig(**NO_GUARD))
    limits = BatchLimits(max_batch_size=2)
    for rid in ("a", "b"):
        scheduler.add_request(rid, 1, 0.0)
    for t in range(3):  # a and b sample 3 tokens each: level 2
        assert _ran(scheduler, float(t), limits) == ["a", "b"]
        _decode(scheduler, ["a", "b"], float(t) + 0.1)
    _decode(scheduler, ["b"], 3.1)  # b one token further, still level 2 (3 -> 4 tokens)
    scheduler.add_request("c", 1, 4.0)
    decision = scheduler.schedule(4.0, limits)
    assert [w.request_id for w in decision.scheduled] == ["c", "a"]  # FIFO among level 2: a first
    assert decision.preempted == ("b",)


def test_one_iteration_displaces_at_most_the_configured_share_of_the_batch() -> None:
    limits = BatchLimits(max_batch_size=4)
    scheduler = GuardedLAS(LASConfig(max_preempt_fraction=0.25, **NO_GUARD))
    running = [f"old{i}" for i in range(4)]
    for rid in running:
        scheduler.add_request(rid, 1, 0.0)
    for t in range(7):
        _ran(scheduler, float(t), limits)
        _decode(scheduler, running, float(t) + 0.1)
    for i in range(4):  # a burst: four newcomers at once
        scheduler.add_request(f"new{i}", 1, 8.0)
    decision = scheduler.schedule(8.0, limits)
    assert len(decision.preempted) == 1  # a quarter of the batch, not all of it
    assert {w.request_id for w in decision.scheduled} == {"new0", "old0", "old1", "old2"}


def flood_within_the_starvation_bound(scheduler_type: type[GuardedLAS], config: LASConfig,
                                      step_s: float = 0.1) -> dict[str, Any]:
    """A long request, then a newcomer every iteration for 30 s at batch 1: asserts the long one
    is held back, runs again within the guard's bound each time and keeps getting service; the
    simulated requests, for further checks."""
    limits = BatchLimits(max_batch_size=1)
    workload = [FakeRequest("long", 0.0, 1, 10_000)]
    workload += [FakeRequest(f"n{i}", 0.5 + i * step_s, 1, 30) for i in range(400)]
    requests = run(scheduler_type(config), workload, limits, step_s, horizon_s=30.0)
    starts = requests["long"].ran_iterations
    attained_by_05 = sum(1 for t in starts if t < 0.5)
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    # it waits at most the largest guard + (1 + slowdown) x its own service, plus one iteration
    bound = config.max_guard_s + (1 + config.guard_slowdown) * step_s * (attained_by_05 + len(starts)) + step_s
    assert max(gaps) > 0.5, "the flood must actually hold the long request back"
    assert max(gaps) <= bound
    assert starts[-1] > 25.0, "it keeps getting service until the horizon"
    return requests


def test_starvation_bound_a_served_request_runs_again_within_the_guard() -> None:
    """A long request, then a newcomer every iteration forever: the guard lets it back in."""
    flood_within_the_starvation_bound(
        GuardedLAS, LASConfig(min_guard_s=0.5, max_guard_s=2.0, guard_slowdown=0.2, use_gittins=False))


def test_newcomers_go_ahead_of_guarded_requests_but_only_in_half_the_batch() -> None:
    scheduler = GuardedLAS(LASConfig(min_guard_s=0.1, max_guard_s=0.1, use_gittins=False))
    limits = BatchLimits(max_batch_size=2)
    for rid in ("old1", "old2"):
        scheduler.add_request(rid, 1, 0.0)
    _ran(scheduler, 0.0, limits)
    _decode(scheduler, ["old1", "old2"], 0.1)
    scheduler.add_request("new1", 1, 5.0)
    decision = scheduler.schedule(5.0, limits)
    assert scheduler.state("old1").guarded and not scheduler.state("new1").guarded
    assert [w.request_id for w in decision.scheduled] == ["new1", "old1"]
    assert decision.preempted == ("old2",)
    for rid in ("new2", "new3"):  # more newcomers than the batch: guarded keep their half
        scheduler.add_request(rid, 1, 5.0)
    assert _ran(scheduler, 5.0, limits) == ["new1", "old1"]
    scheduler.remove_request("new1")
    assert _ran(scheduler, 5.0, limits) == ["new2", "old1"]


def test_learned_lengths_of_equal_size_run_a_started_request_to_completion() -> None:
    """Every output is 8 tokens: the Gittins index rises with service, so a started request keeps
    its slot against a newer one past its first token (FCFS-like), unlike least attained service."""
    lengths = [8] * 100
    limits = BatchLimits(max_batch_size=1)
    for learned, expected in ((True, "a"), (False, "b")):
        config = LASConfig(use_gittins=learned, min_guard_s=1e6, max_guard_s=1e6,
                           prior_lengths=tuple(lengths))
        scheduler = GuardedLAS(config)
        scheduler.add_request("a", 1, 0.0)
        for t in range(3):
            _ran(scheduler, float(t), limits)
            _decode(scheduler, ["a"], float(t) + 0.1)
        scheduler.add_request("b", 1, 3.0)
        assert _ran(scheduler, 3.0, limits) == ["b"]  # its first token comes first either way
        _decode(scheduler, ["b"], 3.1)
        assert _ran(scheduler, 3.1, limits) == [expected]


def test_the_guard_follows_the_online_mean_completion_time() -> None:
    config = LASConfig(guard_factor=2.0, min_guard_s=0.5, max_guard_s=50.0, use_gittins=False)
    scheduler = GuardedLAS(config)
    assert scheduler.guard_s() == 50.0  # nothing finished yet: the largest guard
    scheduler.add_request("a", 1, 0.0)
    scheduler.schedule(0.0, BatchLimits())
    _decode(scheduler, ["a"], 3.0, duration=3.0)
    scheduler.remove_request("a")
    assert scheduler.guard_s() == pytest.approx(6.0)
    assert scheduler.mean_iteration_s() == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs", [
    {"quantum_tokens": 0}, {"preempt_margin": 0}, {"max_preempt_fraction": 0.0},
    {"max_preempt_fraction": 1.5}, {"guard_factor": 0.0}, {"guard_slowdown": -1.0},
    {"min_guard_s": 2.0, "max_guard_s": 1.0}, {"refit_every": 0},
])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LASConfig(**kwargs)  # type: ignore[arg-type]


def test_duplicate_ids_are_refused_and_unknown_removals_ignored() -> None:
    scheduler = GuardedLAS()
    scheduler.add_request("a", 3, 0.0)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add_request("a", 3, 0.0)
    scheduler.remove_request("zzz")
    assert "a" in scheduler and len(scheduler) == 1


def test_with_a_rising_hazard_prior_and_no_newcomer_rule_it_is_exactly_fcfs() -> None:
    """ShareGPT-shaped lengths (near exponential, index rising after the first tokens): the Gittins
    order never preempts a started request, so every completion time equals FCFS's."""
    from elastic_llm.scheduling import FCFS, WorkloadItem, make_workload
    from elastic_llm.scheduling.workloads import load_length_sample
    from elastic_llm.sim import IterationTimeModel, simulate

    prior = tuple(max(4, round(o * 0.15)) for _, o in load_length_sample("sharegpt"))
    items = [WorkloadItem(i.arrival_s, max(4, round(i.prompt_tokens * 0.15)), max(4, round(i.output_tokens * 0.15)))
             for i in make_workload(120, 6.0, "sharegpt", cv=4.0, seed=3)]
    model, limits = IterationTimeModel(0.05, 0.009, 0.0029), BatchLimits(max_batch_size=4, max_batch_tokens=512)
    config = LASConfig(prior_lengths=prior, learn_online=False, newcomers_first=False,
                       min_guard_s=1e6, max_guard_s=1e6)
    fcfs = simulate(FCFS(), items, model, limits)
    las = simulate(GuardedLAS(config), items, model, limits)
    assert max(t.time_to_first_token_s for t in fcfs) > 5.0, "queues must form"
    assert [t.finish_s for t in las] == pytest.approx([t.finish_s for t in fcfs])
