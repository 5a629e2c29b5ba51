"""Skip-join MLFQ on hand-built scenarios (no executor beyond explicit update calls)."""

from __future__ import annotations

import math

import pytest

from elastic_llm.scheduling import (
    BatchLimits,
    IterationOutcome,
    LinearPrefillPredictor,
    MLFQConfig,
    ScheduledWork,
    SchedulerOutput,
    SkipJoinMLFQ,
)

PER_TOKEN = LinearPrefillPredictor(0.0, 0.001)  # 1 ms per prompt token


def ids(output) -> list[str]:
    return [work.request_id for work in output.scheduled]


def ran(sched: SkipJoinMLFQ, now: float, duration: float, computed: dict[str, int]) -> None:
    sched.update(IterationOutcome(now=now, duration=duration, computed=computed))


def test_config_quanta_double_in_seconds_and_bottom_is_unbounded() -> None:
    cfg = MLFQConfig(base_quantum_s=0.01, num_levels=4)
    assert [cfg.quantum(i) for i in range(3)] == pytest.approx([0.01, 0.02, 0.04])
    assert cfg.quantum(3) == math.inf
    assert cfg.join_level(0.0) == 0
    assert cfg.join_level(0.01) == 0  # quantum covers the prefill exactly
    assert cfg.join_level(0.0100001) == 1
    assert cfg.join_level(0.04) == 2
    assert cfg.join_level(99.0) == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"base_quantum_s": 0}, {"num_levels": 0}, {"starvation_alpha_s": 0}, {"preempt_margin": 0}],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MLFQConfig(**kwargs)  # type: ignore[arg-type]


def test_skip_join_needs_a_predictor() -> None:
    with pytest.raises(ValueError):
        SkipJoinMLFQ(MLFQConfig())
    SkipJoinMLFQ(MLFQConfig(skip_join=False))  # plain MLFQ needs none


def test_skip_join_level_choice() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01, num_levels=6), PER_TOKEN)
    for rid, tokens in {"a": 5, "b": 10, "c": 15, "d": 100, "e": 100_000}.items():
        sched.add_request(rid, tokens, now=0.0)
    levels = {rid: sched.state(rid).level for rid in "abcde"}
    # predicted 5, 10, 15, 100 ms, 100 s vs quanta 10, 20, 40, 80, 160 ms, inf
    assert levels == {"a": 0, "b": 0, "c": 1, "d": 4, "e": 5}


def test_plain_mlfq_joins_every_request_at_the_top() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(skip_join=False), PER_TOKEN)
    sched.add_request("long", 100_000, now=0.0)
    assert sched.state("long").level == 0


def test_demotion_when_quantum_used_up_resets_attained_service() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    sched.add_request("a", 1, now=0.0)
    limits = BatchLimits()
    for k in range(2):
        assert ids(sched.schedule(0.004 * k, limits)) == ["a"]
        ran(sched, 0.004 * (k + 1), 0.004, {"a": 1})
    assert sched.state("a").level == 0
    assert sched.state("a").attained_s == pytest.approx(0.008)
    ran(sched, 0.012, 0.004, {"a": 1})  # 12 ms >= 10 ms quantum
    assert sched.state("a").level == 1
    assert sched.state("a").attained_s == 0.0  # reset, not carried over
    for k in range(4):  # level 1 needs 20 ms more, counted afresh
        ran(sched, 0.016 + 0.004 * k, 0.004, {"a": 1})
    assert sched.state("a").level == 1
    ran(sched, 0.032, 0.004, {"a": 1})
    assert sched.state("a").level == 2


def test_quanta_are_time_not_iterations() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01, skip_join=False))
    sched.add_request("slow", 1, now=0.0)
    sched.add_request("fast", 1, now=0.0)
    ran(sched, 0.05, 0.05, {"slow": 1})  # one long iteration uses the whole quantum
    for k in range(9):  # nine short ones do not
        ran(sched, 0.05 + 0.001 * (k + 1), 0.001, {"fast": 1})
    assert sched.state("slow").level == 1
    assert sched.state("fast").level == 0


def test_only_requests_that_ran_attain_service() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(skip_join=False))
    sched.add_request("a", 1, now=0.0)
    sched.add_request("b", 1, now=0.0)
    ran(sched, 0.005, 0.005, {"a": 1})
    assert sched.state("a").attained_s == pytest.approx(0.005)
    assert sched.state("b").attained_s == 0.0
    ran(sched, 0.006, 0.001, {"ghost": 3})  # unknown ids are ignored
    assert len(sched) == 2 and "ghost" not in sched


def test_promotion_after_alpha_to_top_level_with_reset() -> None:
    cfg = MLFQConfig(base_quantum_s=1.0, starvation_alpha_s=0.5)
    sched = SkipJoinMLFQ(cfg, LinearPrefillPredictor(0.0, 0.01))
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("short", 10, now=0.0)  # 0.1 s -> level 0
    sched.add_request("long", 300, now=0.0)  # 3 s -> level 2
    assert sched.state("long").level == 2
    now = 0.0
    while now < 0.5 - 1e-9:
        assert ids(sched.schedule(now, limits)) == ["short"]
        now += 0.1
        ran(sched, now, 0.1, {"short": 1})
    sched.schedule(0.5, limits)  # waited exactly alpha: not yet
    assert sched.state("long").level == 2
    sched.add_request("newcomer", 10, now=0.55)
    sched.schedule(0.6, limits)  # waited 0.6 s > alpha
    state = sched.state("long")
    assert (state.level, state.attained_s, state.protected) == (0, 0.0, True)
    # the promoted request is queued by when it started waiting: ahead of the newcomer
    order = [entry.request_id for entry in sched.queue()]
    assert order.index("long") < order.index("newcomer")


def test_promoted_request_runs_once_the_incumbent_leaves_level_zero() -> None:
    cfg = MLFQConfig(base_quantum_s=0.2, starvation_alpha_s=0.25)
    sched = SkipJoinMLFQ(cfg, LinearPrefillPredictor(0.0, 0.01))
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("short", 10, now=0.0)
    sched.add_request("long", 300, now=0.0)
    now, seen = 0.0, []
    for _ in range(6):
        out = sched.schedule(now, limits)
        seen.append(ids(out)[0])
        now += 0.1
        ran(sched, now, 0.1, {ids(out)[0]: 1})
    # short uses its 0.2 s level-0 quantum in 2 iterations and drops to level 1, still above long
    # (level 4); at 0.3 long has waited 0.3 s > alpha, is promoted to level 0 and preempts short,
    # runs its own level-0 quantum (2 iterations), drops to level 1 behind short, which resumes.
    assert seen == ["short", "short", "short", "long", "long", "short"]


def test_batch_formation_highest_level_first_fifo_within_level() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    sched.add_request("L2", 30, now=0.0)  # 30 ms -> level 2
    sched.add_request("L0a", 5, now=0.1)
    sched.add_request("L1", 15, now=0.2)
    sched.add_request("L0b", 5, now=0.3)
    assert ids(sched.schedule(0.3, BatchLimits())) == ["L0a", "L0b", "L1", "L2"]
    assert ids(sched.schedule(0.3, BatchLimits(max_batch_size=2))) == ["L0a", "L0b"]


def test_token_budget_chunks_prefill_and_stops_the_batch() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=1.0, skip_join=False))
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=100)
    sched.add_request("a", 50, now=0.0)
    sched.add_request("b", 300, now=0.0)
    sched.add_request("c", 10, now=0.0)
    out = sched.schedule(0.0, limits)
    assert out.scheduled == (ScheduledWork("a", 50), ScheduledWork("b", 50))
    assert out.num_tokens == 100
    ran(sched, 0.01, 0.01, {"a": 50, "b": 50})
    out = sched.schedule(0.01, limits)  # a decodes one token, b continues its prefill
    assert out.scheduled == (ScheduledWork("a", 1), ScheduledWork("b", 99))
    ran(sched, 0.02, 0.01, {"a": 1, "b": 99})
    assert sched.state("b").pending_tokens == 151


def test_hysteresis_equal_level_newcomer_does_not_preempt() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("run", 15, now=0.0)  # level 1
    assert ids(sched.schedule(0.0, limits)) == ["run"]
    ran(sched, 0.005, 0.005, {"run": 15})
    sched.add_request("peer", 12, now=0.005)  # level 1 too
    out = sched.schedule(0.005, limits)
    assert ids(out) == ["run"] and out.preempted == ()
    ran(sched, 0.01, 0.005, {"run": 1})
    sched.add_request("urgent", 3, now=0.01)  # level 0: strictly higher
    out = sched.schedule(0.01, limits)
    assert ids(out) == ["urgent"] and out.preempted == ("run",)


def test_preempt_margin_requires_that_many_levels() -> None:
    cfg = MLFQConfig(base_quantum_s=0.01, preempt_margin=2)
    sched = SkipJoinMLFQ(cfg, PER_TOKEN)
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("run", 30, now=0.0)  # level 2
    sched.schedule(0.0, limits)
    ran(sched, 0.001, 0.001, {"run": 30})
    sched.add_request("one_up", 15, now=0.001)  # level 1: only one level higher
    assert ids(sched.schedule(0.001, limits)) == ["run"]
    ran(sched, 0.002, 0.001, {"run": 1})
    sched.add_request("two_up", 5, now=0.002)  # level 0: two levels higher
    assert ids(sched.schedule(0.002, limits)) == ["two_up"]


def test_demoted_request_goes_behind_its_new_levels_queue() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("peer", 15, now=0.0)  # level 1, waiting
    sched.add_request("a", 5, now=0.0)  # level 0
    assert ids(sched.schedule(0.0, limits)) == ["a"]
    ran(sched, 0.01, 0.01, {"a": 5})  # a is demoted to level 1
    out = sched.schedule(0.01, limits)
    assert ids(out) == ["peer"] and out.preempted == ("a",)


def test_preempted_request_resumes_ahead_of_later_arrivals() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("a", 15, now=0.0)  # level 1
    sched.schedule(0.0, limits)
    ran(sched, 0.001, 0.001, {"a": 15})
    sched.add_request("x", 3, now=0.001)  # level 0 preempts a
    assert ids(sched.schedule(0.001, limits)) == ["x"]
    ran(sched, 0.002, 0.001, {"x": 3})
    sched.add_request("c", 15, now=0.002)  # level 1, arrives after a
    sched.remove_request("x")
    assert ids(sched.schedule(0.002, limits)) == ["a"]


def test_mark_kv_dropped_restores_prefill_and_keeps_level() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    sched.add_request("a", 15, now=0.0)
    ran(sched, 0.001, 0.001, {"a": 15})
    assert sched.state("a").pending_tokens == 0
    sched.mark_kv_dropped("a", 18)
    assert (sched.state("a").pending_tokens, sched.state("a").level) == (18, 1)
    assert sched.schedule(0.001, BatchLimits()).scheduled == (ScheduledWork("a", 18),)
    sched.mark_kv_dropped("unknown", 3)  # ignored


def test_add_twice_raises_and_remove_unknown_is_ignored() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(skip_join=False))
    sched.add_request("a", 1, now=0.0)
    with pytest.raises(ValueError):
        sched.add_request("a", 1, now=0.0)
    sched.remove_request("zzz")
    sched.schedule(0.0, BatchLimits())
    ran(sched, 0.001, 0.001, {"a": 1})
    sched.remove_request("a")
    assert len(sched) == 0
    sched.add_request("a", 1, now=0.002)  # the id reused: not an incumbent any more
    assert not sched.state("a").protected
    sched.remove_request("a")
    assert sched.schedule(0.0, BatchLimits()) == SchedulerOutput.empty()


def test_estimate_next_scheduled() -> None:
    cfg = MLFQConfig(base_quantum_s=1.0, starvation_alpha_s=100.0)
    sched = SkipJoinMLFQ(cfg, LinearPrefillPredictor(0.0, 0.001))
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("a", 10, now=0.0)  # level 0
    sched.add_request("b", 10, now=0.0)  # level 0
    sched.add_request("c", 3000, now=0.0)  # 3 s -> level 2
    sched.schedule(0.0, limits)
    ran(sched, 0.25, 0.25, {"a": 10})
    sched.schedule(0.25, limits)
    est = sched.estimate_next_scheduled(0.25, limits)
    # a runs now; b after a's remaining 0.75 s at level 0; c after a and b each run the rest of
    # level 0 and all of level 1 (2 s): 0.75 + 2 + 1 + 2 = 5.75 s
    assert est == pytest.approx({"a": 0.25, "b": 1.0, "c": 6.0})
    # with a 2-slot batch b runs now and c starts when the first of a, b falls behind it
    two = BatchLimits(max_batch_size=2)
    assert sched.estimate_next_scheduled(0.25, two)["c"] == pytest.approx(0.25 + 2.75)


def test_estimate_is_capped_by_starvation_promotion() -> None:
    cfg = MLFQConfig(base_quantum_s=1.0, starvation_alpha_s=2.0, num_levels=3)
    sched = SkipJoinMLFQ(cfg, LinearPrefillPredictor(0.0, 0.001))
    limits = BatchLimits(max_batch_size=1)
    sched.add_request("bottom1", 10_000, now=0.0)  # bottom level: unbounded quantum
    sched.add_request("bottom2", 10_000, now=0.5)
    sched.schedule(0.5, limits)
    est = sched.estimate_next_scheduled(1.0, limits)
    assert est["bottom1"] == 1.0
    assert est["bottom2"] == pytest.approx(2.5)  # arrived 0.5 + alpha 2.0, not inf


def test_skip_cached_shortens_the_prefill_without_charging_service() -> None:
    sched = SkipJoinMLFQ(MLFQConfig(base_quantum_s=0.01), PER_TOKEN)
    sched.add_request("a", 30, now=0.0)
    level = sched.state("a").level
    sched.skip_cached("a", 24)
    assert sched.state("a").pending_tokens == 6 and sched.state("a").level == level
    assert sched.state("a").attained_s == 0.0
    assert sched.schedule(0.0, BatchLimits()).scheduled == (ScheduledWork("a", 6),)
    sched.skip_cached("a", 100)  # at least the token that samples remains
    assert sched.state("a").pending_tokens == 1
    sched.skip_cached("unknown", 3)  # ignored
