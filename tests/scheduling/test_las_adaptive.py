"""AdaptiveLAS ("las-adaptive"): first tokens in extra slots, the queue gate, the tail-following
guard, and its starvation bound (pure, milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from elastic_llm.scheduling import BatchLimits, IterationOutcome
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig
from elastic_llm.scheduling.workloads import load_length_sample
from tests.scheduling.test_las import flood_within_the_starvation_bound

#: every output 8 tokens: the Gittins index rises with service, so by rank a started request keeps
#: its slot (FCFS-like); only the first-token rule brings a newcomer in
EQUAL = dict(min_guard_s=1e6, max_guard_s=1e6, prior_lengths=(8,) * 100)


def _decode(scheduler: AdaptiveLAS, ids: list[str], now: float, duration: float = 0.1) -> None:
    scheduler.update(IterationOutcome(now, duration, {rid: 1 for rid in ids}, tuple(ids)))


def _start(scheduler: AdaptiveLAS, ids: list[str], limits: BatchLimits, tokens: int = 3) -> None:
    """Admit `ids` at t=0 and let each sample `tokens` tokens together."""
    for rid in ids:
        scheduler.add_request(rid, 1, 0.0)
    for t in range(tokens):
        assert sorted(w.request_id for w in scheduler.schedule(t * 0.1, limits).scheduled) == sorted(ids)
        _decode(scheduler, ids, t * 0.1 + 0.1)


def test_a_newcomer_runs_its_first_token_in_an_extra_slot_without_displacing_anyone() -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_slots=0.25, **EQUAL))
    limits = BatchLimits(max_batch_size=4)
    running = ["a", "b", "c", "d"]
    _start(scheduler, running, limits)
    scheduler.add_request("new", 7, 1.0)
    scheduler.add_request("new2", 5, 1.0)
    decision = scheduler.schedule(1.0, limits)
    assert decision.preempted == ()
    assert [w.request_id for w in decision.scheduled] == [*running, "new"]  # one extra: a quarter of 4
    assert decision.scheduled[-1].num_tokens == 7  # its whole prefill
    scheduler.update(IterationOutcome(1.3, 0.3, {**{r: 1 for r in running}, "new": 7}, (*running, "new")))
    decision = scheduler.schedule(1.3, limits)  # next iteration: the other newcomer's turn
    assert [w.request_id for w in decision.scheduled] == [*running, "new2"] and decision.preempted == ()


def test_without_extra_slots_the_first_token_takes_a_decode_slot_as_in_las_guard() -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_slots=0, **EQUAL))
    limits = BatchLimits(max_batch_size=2)
    _start(scheduler, ["a", "b"], limits)
    scheduler.add_request("new", 1, 1.0)
    decision = scheduler.schedule(1.0, limits)
    assert len(decision.scheduled) == 2 and decision.scheduled[0].request_id == "new"
    assert len(decision.preempted) == 1


def test_extra_slots_scale_with_the_batch() -> None:
    config = AdaptiveLASConfig()
    assert [config.extra_slots(b) for b in (1, 4, 8, 9, 32)] == [1, 1, 2, 3, 8]
    assert AdaptiveLASConfig(first_token_slots=0).extra_slots(32) == 0


def test_first_tokens_go_early_only_once_the_newcomer_has_waited_the_gate() -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_wait_iterations=5, **EQUAL))
    limits = BatchLimits(max_batch_size=2)
    _start(scheduler, ["a", "b"], limits)  # mean iteration 0.1 s: the gate is 0.5 s
    scheduler.add_request("new", 1, 1.0)
    early = scheduler.schedule(1.2, limits)
    assert [w.request_id for w in early.scheduled] == ["a", "b"]
    _decode(scheduler, ["a", "b"], 1.3)
    late = scheduler.schedule(1.6, limits)
    assert [w.request_id for w in late.scheduled] == ["a", "b", "new"]


@pytest.mark.parametrize(("guard", "extra_at_0_5_s", "extra_at_1_1_s"), [(0.0, 1, 1), (10.0, 1, 4)])
def test_newcomers_past_the_first_token_guard_take_extra_slots_up_to_a_batch(
        guard: float, extra_at_0_5_s: int, extra_at_1_1_s: int) -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_guard_iterations=guard, **EQUAL))
    limits = BatchLimits(max_batch_size=4)
    running = ["a", "b", "c", "d"]
    _start(scheduler, running, limits)  # mean iteration 0.1 s: the guard is 1.0 s
    burst = [f"n{i}" for i in range(6)]
    for rid in burst:
        scheduler.add_request(rid, 1, 0.3)
    for wait, extra in ((0.5, extra_at_0_5_s), (1.1, extra_at_1_1_s)):
        decision = scheduler.schedule(0.3 + wait, limits)
        names = [w.request_id for w in decision.scheduled]
        assert names[:4] == running and decision.preempted == ()  # nobody running is displaced
        assert names[4:] == burst[:extra]  # a quarter of the batch, or every late newcomer up to a batch
    assert AdaptiveLASConfig().first_token_guard_iterations == 0  # off in las-adaptive


def test_the_young_slack_follows_tail_and_burstiness() -> None:
    config = AdaptiveLASConfig(young_guard_factor=2.0, young_guard_heavy=6.0, tail_cv_light=2.0,
                               tail_cv_heavy=3.0, bursty_arrival_cv=2.0)
    assert config.young_factor(None, 5.0) == 2.0 and config.young_factor(3.0, None) == 2.0
    assert config.young_factor(1.0, 5.0) == 2.0  # light tail
    assert config.young_factor(3.5, 1.0) == 2.0  # heavy tail, smooth arrivals
    assert config.young_factor(3.5, 5.0) == 6.0
    assert config.young_factor(2.5, 5.0) == pytest.approx(4.0)  # linear in between


@pytest.mark.parametrize(("dataset", "low", "high"), [("sharegpt", 0.8, 1.3), ("pareto-cv3", 2.6, 3.4)])
def test_the_tail_is_measured_from_the_prior(dataset: str, low: float, high: float) -> None:
    prior = tuple(max(4, round(o * 0.15)) for _, o in load_length_sample(dataset))  # type: ignore[arg-type]
    scheduler = AdaptiveLAS(AdaptiveLASConfig(prior_lengths=prior))
    cv = scheduler.tail_cv()
    assert cv is not None and low < cv < high


def test_arrival_burstiness_is_measured_from_the_gaps() -> None:
    rng = np.random.default_rng(0)
    smooth, bursty = AdaptiveLAS(), AdaptiveLAS()
    for i, (a, b) in enumerate(zip(np.arange(64) * 1.0, np.cumsum(rng.gamma(1 / 16, 16.0, 64)))):
        smooth.add_request(f"s{i}", 1, float(a))
        bursty.add_request(f"b{i}", 1, float(b))
    assert smooth.arrival_cv() == pytest.approx(0.0, abs=1e-9)
    cv = bursty.arrival_cv()
    assert cv is not None and cv > 2.0


def test_starvation_bound_under_a_flood_of_newcomers_in_extra_slots() -> None:
    """A long request, then a newcomer every iteration forever: the guard lets it back in."""
    step_s = 0.1
    requests = flood_within_the_starvation_bound(
        AdaptiveLAS, AdaptiveLASConfig(min_guard_s=0.5, max_guard_s=2.0, guard_slowdown=0.2, use_gittins=False),
        step_s)
    firsts = [r.first_token_s - r.arrival_s for r in requests.values()
              if r.first_token_s is not None and r.request_id != "long"]
    assert len(firsts) > 250 and max(firsts) <= 2 * step_s + 1e-9  # every first token in the next iteration


def test_first_tokens_run_alone_once_a_share_of_the_batch_waits_and_the_paused_return() -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_slots=0.5, first_tokens_alone_at=0.5, **EQUAL))
    limits = BatchLimits(max_batch_size=4)
    running = ["a", "b", "c", "d"]
    _start(scheduler, running, limits)
    scheduler.add_request("new", 5, 1.0)  # one of four waits: under half the batch, beside the decodes
    decision = scheduler.schedule(1.0, limits)
    assert [w.request_id for w in decision.scheduled] == [*running, "new"] and decision.preempted == ()
    scheduler.update(IterationOutcome(1.3, 0.3, {**{r: 1 for r in running}, "new": 5}, (*running, "new")))
    for rid in ("x", "y", "z"):  # a burst: three wait, and two fit the extra slots
        scheduler.add_request(rid, 4, 1.3)
    decision = scheduler.schedule(1.3, limits)
    ids = [w.request_id for w in decision.scheduled]
    assert sorted(ids) == ["x", "y"]  # first tokens alone: no decode step beside the prefills
    assert sorted(decision.preempted) == running  # ("new" ran in an extra slot: no incumbent)
    scheduler.update(IterationOutcome(1.5, 0.2, {"x": 4, "y": 4}, ("x", "y")))
    decision = scheduler.schedule(1.5, limits)  # "z" alone waits: under the share, the batch is back
    ids = [w.request_id for w in decision.scheduled]
    assert set(running) <= set(ids) and "z" in ids
    assert decision.preempted == (), "the paused requests did not run last iteration: none preempted again"


def test_first_tokens_alone_also_apply_when_first_tokens_take_decode_slots() -> None:
    scheduler = AdaptiveLAS(AdaptiveLASConfig(first_token_slots=0, first_tokens_alone_at=0.5, **EQUAL))
    limits = BatchLimits(max_batch_size=4)
    _start(scheduler, ["a", "b", "c", "d"], limits)
    for rid in ("x", "y"):  # half the batch waits: the newcomers take decode slots, then run alone
        scheduler.add_request(rid, 3, 1.0)
    decision = scheduler.schedule(1.0, limits)
    assert sorted(w.request_id for w in decision.scheduled) == ["x", "y"]
    assert sorted(decision.preempted) == ["a", "b", "c", "d"]


def test_starvation_bound_with_first_tokens_alone() -> None:
    """Under a flood of newcomers every iteration holds first tokens alone; the guarded still run."""
    flood_within_the_starvation_bound(
        AdaptiveLAS, AdaptiveLASConfig(min_guard_s=0.5, max_guard_s=2.0, guard_slowdown=0.2, use_gittins=False,
                                       first_tokens_alone_at=1e-9))


def test_on_sharegpt_shaped_bursts_extra_slots_cost_less_mean_jct_than_las_guards_rule() -> None:
    """Side by side in the simulator: first tokens in a decode slot (las-guard) against extra slots."""
    from elastic_llm.scheduling import FCFS, GuardedLAS, LASConfig, WorkloadItem, make_workload
    from elastic_llm.sim import IterationTimeModel, simulate

    prior = tuple(max(4, round(o * 0.15)) for _, o in load_length_sample("sharegpt"))
    items = [WorkloadItem(i.arrival_s, max(4, round(i.prompt_tokens * 0.15)), max(4, round(i.output_tokens * 0.15)))
             for i in make_workload(150, 6.0, "sharegpt", cv=4.0, seed=3)]
    model, limits = IterationTimeModel(0.05, 0.009, 0.0029), BatchLimits(max_batch_size=4, max_batch_tokens=512)
    results = {}
    for name, scheduler in (("fcfs", FCFS()),
                            ("guard", GuardedLAS(LASConfig(prior_lengths=prior, learn_online=False))),
                            ("adaptive", AdaptiveLAS(AdaptiveLASConfig(prior_lengths=prior, learn_online=False)))):
        timings = simulate(scheduler, items, model, limits)
        results[name] = (np.mean([t.completion_time_s for t in timings]),
                         np.percentile([t.time_to_first_token_s for t in timings], 99))
    assert results["fcfs"][1] > 5.0, "queues must form"
    assert results["adaptive"][0] < results["guard"][0]
    assert results["fcfs"][1] / results["adaptive"][1] >= 5.0


@pytest.mark.parametrize("kwargs", [
    {"first_token_slots": -0.1}, {"first_token_wait_iterations": -1.0}, {"first_tokens_alone_at": -0.5},
    {"first_token_guard_iterations": -1.0},
    {"young_guard_heavy": 0.0},
    {"tail_cv_light": 3.0, "tail_cv_heavy": 2.0}, {"arrival_window": 2}, {"guard_factor": 0.0},
])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AdaptiveLASConfig(**kwargs)  # type: ignore[arg-type]
