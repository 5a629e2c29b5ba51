"""Grace-period arrangement: deadlines hold, progress is maximal, the cheapest requests recompute."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_llm.planning.arrangement import (
    BatchAction,
    GracePeriod,
    MigrationTimeModel,
    RunningBatch,
    RunningRequest,
    arrange,
)
from elastic_llm.planning.config import ParallelConfig, Placement, Worker
from elastic_llm.planning.errors import PlanningError
from elastic_llm.planning.migration import MigrationPlanner

from .helpers import FAST, tiny_model


@st.composite
def situations(draw: st.DrawFn):
    """Batches, requests and a migration model at some time after a notice at t=100, grace 30 s."""
    n_batches = draw(st.integers(1, 3))
    now = 100.0 + draw(st.floats(0.0, 5.0))
    batches = [RunningBatch(d, draw(st.floats(0.05, 2.0)), now + draw(st.floats(0.0, 1.0)))
               for d in range(n_batches)]
    requests = [RunningRequest(f"r{d}.{i}", d, draw(st.integers(1, 300)), draw(st.integers(0, 25)),
                               draw(st.integers(1, 100)), draw(st.floats(0.01, 5.0)))
                for d in range(n_batches) for i in range(draw(st.integers(1, 3)))]
    migration = MigrationTimeModel(draw(st.floats(0.0, 30.0)), draw(st.floats(500.0, 1e5)))
    return now, GracePeriod(100.0, 30.0), batches, requests, migration


def outcome(now: float, batches, requests, migration, steps: list[int],
            dropped: tuple[str, ...] = ()) -> tuple[float, float]:
    """(migration start, migration end) if batch d decodes ``steps[d]`` more tokens and the KV of
    the ``dropped`` requests is not moved."""
    pauses = [max(b.busy_until, now) + k * b.decode_step_seconds for b, k in zip(batches, steps)]
    by_replica = {b.replica: k for b, k in zip(batches, steps)}
    kv = sum((r.context_tokens + by_replica[r.replica]) * r.kv_bytes_per_token for r in requests
             if r.remaining_tokens > by_replica[r.replica] and r.request_id not in dropped)
    start = max([now, *pauses])
    return start, start + migration.seconds(kv)


@FAST
@given(situations())
def test_feasible_arrangements_end_before_the_deadline_with_maximal_cutoff(case) -> None:
    now, grace, batches, requests, migration = case
    got = arrange(now, grace, batches, requests, migration)
    margin = max(b.decode_step_seconds for b in batches)
    most = [max(r.remaining_tokens for r in requests if r.replica == b.replica) for b in batches]
    steps = [d.extra_tokens for d in got.decisions]
    if not got.feasible:
        return
    start, end = outcome(now, batches, requests, migration, steps, got.recompute)
    assert end + margin <= grace.deadline + 1e-9
    assert (got.migration_start, got.estimated_end) == pytest.approx((start, end))
    assert set(got.keep_kv) | set(got.finished) | set(got.recompute) == {
        r.request_id for r in requests}
    if got.recompute:  # the knapsack branch: nobody decodes further (tested below)
        assert all(d.extra_tokens == 0 for d in got.decisions)
        return
    # brute force: no common cut-off later than the chosen one is feasible
    chosen = max([now] + [max(b.busy_until, now) + k * b.decode_step_seconds
                          for b, k in zip(batches, steps)])
    for cutoff in sorted({max(b.busy_until, now) + k * b.decode_step_seconds
                          for b, m in zip(batches, most) for k in range(m + 1)}):
        if cutoff <= chosen + 1e-9:
            continue
        later = [min(m, max(0, math.floor((cutoff - max(b.busy_until, now)) / b.decode_step_seconds
                                          + 1e-9))) for b, m in zip(batches, most)]
        assert outcome(now, batches, requests, migration, later)[1] + margin > grace.deadline
    for decision, m in zip(got.decisions, most):
        assert (decision.action is BatchAction.FINISH) == (decision.extra_tokens >= m)


@FAST
@given(situations())
def test_when_kv_cannot_all_move_the_cheapest_requests_recompute(case) -> None:
    now, grace, batches, requests, migration = case
    # make decoding impossible to fit: the weights alone leave a window that not all KV fits in
    total = sum(r.context_tokens * r.kv_bytes_per_token for r in requests if r.remaining_tokens)
    busy = max(max(b.busy_until, now) for b in batches)
    margin = max(b.decode_step_seconds for b in batches)
    window = grace.deadline - margin - busy - 0.5 * total / migration.kv_bytes_per_second
    if window <= 0:
        return
    tight = MigrationTimeModel(window, migration.kv_bytes_per_second)
    got = arrange(now, grace, batches, requests, tight)
    if all(d.extra_tokens == 0 for d in got.decisions) and got.recompute:
        capacity = 0.5 * total
        live = [r for r in requests if r.remaining_tokens > 0]
        best = min(sum(r.recompute_seconds for r in live if r not in kept)
                   for n in range(len(live) + 1) for kept in itertools.combinations(live, n)
                   if sum(r.context_tokens * r.kv_bytes_per_token for r in kept) <= capacity)
        lost = sum(r.recompute_seconds for r in requests if r.request_id in got.recompute)
        assert lost == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert got.feasible and got.estimated_end + margin <= grace.deadline + 1e-9


def test_too_slow_weights_mean_everyone_recomputes() -> None:
    batches = [RunningBatch(0, 0.1, 100.0)]
    requests = [RunningRequest("a", 0, 500, 10, 100, 1.0)]
    got = arrange(100.0, GracePeriod(100.0, 30.0), batches, requests, MigrationTimeModel(45.0, 1e9))
    assert not got.feasible and got.recompute == ("a",) and got.keep_kv == ()
    assert got.decisions[0].action is BatchAction.PAUSE_NOW


def test_a_short_batch_finishes_and_a_long_one_pauses() -> None:
    batches = [RunningBatch(0, 0.1, 100.0), RunningBatch(1, 0.1, 100.0)]
    requests = [RunningRequest("short", 0, 500, 5, 100, 1.0),
                RunningRequest("long", 1, 500, 1000, 100, 1.0)]
    got = arrange(100.0, GracePeriod(100.0, 30.0), batches, requests, MigrationTimeModel(10.0, 1e9))
    short, long_ = got.decisions
    assert short.action is BatchAction.FINISH and short.extra_tokens == 5
    assert long_.action is BatchAction.DECODE_THEN_PAUSE
    # 30 s grace - 10 s migration - 0.1 s margin: 199 steps of 0.1 s (KV transfer ~0.05 ms)
    assert long_.extra_tokens == 198
    assert got.finished == ("short",) and got.keep_kv == ("long",)


def test_arrangement_with_a_real_plan_estimate() -> None:
    model = tiny_model()
    config = ParallelConfig(1, 2, 1, 1)
    old = Placement(config, ("a", "b"))
    new = Placement(config, ("a", "c"))  # b leaves: its stage and KV move to c
    workers = [Worker(n, bandwidth=2e5) for n in "abc"]
    plan = MigrationPlanner(model).plan(new, workers, old, {0: 40}, (0,))
    timing = plan.time_model()
    assert timing.seconds(plan.kv_total_bytes) == pytest.approx(plan.weight_seconds + plan.kv_seconds)
    batch = RunningBatch(0, 0.05, 200.0)
    request = RunningRequest("q", 0, 40, 500, model.kv_bytes_per_token, 2.0)
    got = arrange(200.0, GracePeriod(195.0, 30.0), [batch], [request], timing)
    assert got.feasible and got.estimated_end + 0.05 <= 225.0
    assert 0 < got.decisions[0].extra_tokens < 500


def test_inputs_are_validated() -> None:
    with pytest.raises(PlanningError):
        arrange(99.0, GracePeriod(100.0), [], [], MigrationTimeModel(1.0, 1.0))
    with pytest.raises(PlanningError):
        arrange(100.0, GracePeriod(100.0), [RunningBatch(0, 0.1, 100.0)],
                [RunningRequest("x", 7, 1, 1, 1, 1.0)], MigrationTimeModel(1.0, 1.0))
    with pytest.raises(PlanningError):
        RunningBatch(0, 0.0, 0.0)
