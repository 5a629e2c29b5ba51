"""The output-length predictor on the prompt and "las-predicted", which ranks by it (pure, milliseconds)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from elastic_llm.scheduling import (
    AdaptiveLAS,
    AdaptiveLASConfig,
    BatchLimits,
    IterationOutcome,
    LASConfig,
    PredictedLAS,
    PredictedLASConfig,
    PromptLengthPredictor,
    make_scheduler,
    scheduler_name,
)
from elastic_llm.scheduling.workloads import WorkloadItem, gamma_arrivals
from elastic_llm.sim.scheduling import IterationTimeModel, simulate
from tests.scheduling.test_las import flood_within_the_starvation_bound

SHORT, LONG = 7, 9  # the token that marks a short answer's prompt, and a long one's
FILLER = [40, 41, 42, 43, 44, 45]  # a prompt's other tokens, as long as the training prompts' on average
TIME = IterationTimeModel(0.05, 0.009, 0.0029)


def _predictable(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of filler tokens plus SHORT (answers of 2-10 tokens) or LONG (150-300 tokens)."""
    rng = np.random.default_rng(seed)
    prompts, lengths = [], []
    for _ in range(n):
        long = bool(rng.random() < 0.5)
        filler = rng.integers(20, 400, size=int(rng.integers(3, 12))).tolist()
        prompts.append([*filler, LONG if long else SHORT])
        lengths.append(int(rng.integers(150, 300)) if long else int(rng.integers(2, 10)))
    return prompts, lengths


@pytest.fixture(scope="module")
def predictor() -> PromptLengthPredictor:
    prompts, lengths = _predictable(200, seed=1)
    return PromptLengthPredictor.fit(prompts, lengths, classes=2)


def test_the_predictor_learns_which_token_means_a_long_answer(predictor: PromptLengthPredictor) -> None:
    prompts, lengths = _predictable(100, seed=2)  # unseen prompts
    labels = [predictor.classify(p) for p in prompts]
    assert np.mean([int(n >= 150) == label for n, label in zip(lengths, labels)]) >= 0.95
    assert predictor.holdout_spearman > 0.7
    short, long = predictor.class_lengths
    assert np.mean(np.array(short) < 10) > 0.9 and np.mean(np.array(long) >= 150) > 0.9  # out-of-fold: a few misses
    assert predictor.predict_length([*FILLER, LONG]) > 10 * predictor.predict_length([*FILLER, SHORT])


def test_a_predictor_of_lengths_the_prompt_does_not_carry_learns_nothing() -> None:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 400, size=8).tolist() for _ in range(300)]
    lengths = rng.integers(1, 300, size=300).tolist()
    fitted = PromptLengthPredictor.fit(prompts, lengths, classes=3)
    assert abs(fitted.holdout_spearman) < 0.2
    means = [float(np.mean(c)) for c in fitted.class_lengths]
    assert max(means) < 1.35 * min(means)  # every class looks like the whole sample


def test_fitting_is_deterministic_and_bad_input_is_refused() -> None:
    prompts, lengths = _predictable(60, seed=4)
    assert PromptLengthPredictor.fit(prompts, lengths) == PromptLengthPredictor.fit(prompts, lengths)
    with pytest.raises(ValueError, match="prompts but"):
        PromptLengthPredictor.fit(prompts, lengths[:-1])
    for bad in (0, 2.5, float("nan")):
        with pytest.raises(ValueError, match="whole number >= 1"):
            PromptLengthPredictor.fit(prompts, [bad, *lengths[1:]])
    with pytest.raises(ValueError, match="token ids"):
        PromptLengthPredictor.fit([[1.5, 2], *prompts[1:]], lengths)
    with pytest.raises(ValueError, match="non-empty"):
        PromptLengthPredictor.fit([[], *prompts[1:]], lengths)
    with pytest.raises(ValueError, match="at least"):
        PromptLengthPredictor.fit(prompts[:4], lengths[:4], classes=4)
    with pytest.raises(ValueError, match="ridge"):
        PromptLengthPredictor.fit(prompts, lengths, ridge=0)


def _decode(scheduler: PredictedLAS, ids: list[str], now: float) -> None:
    scheduler.update(IterationOutcome(now, 0.1, {rid: 1 for rid in ids}, tuple(ids)))


def test_a_predicted_short_request_displaces_a_predicted_long_one_at_once(predictor: PromptLengthPredictor) -> None:
    config = AdaptiveLASConfig(first_token_slots=0, min_guard_s=1e6, max_guard_s=1e6)
    limits = BatchLimits(max_batch_size=1)
    scheduler = PredictedLAS(predictor, config)
    scheduler.note_prompt("essay", [*FILLER, LONG])
    scheduler.add_request("essay", 1, 0.0)
    for t in range(3):  # the essay samples 3 tokens alone
        assert [w.request_id for w in scheduler.schedule(t * 0.1, limits).scheduled] == ["essay"]
        _decode(scheduler, ["essay"], t * 0.1 + 0.1)
    scheduler.note_prompt("word", [*FILLER, SHORT])
    scheduler.add_request("word", 1, 0.3)
    assert scheduler.length_class("essay") == 1 and scheduler.length_class("word") == 0
    decision = scheduler.schedule(0.3, limits)  # its first token
    assert [w.request_id for w in decision.scheduled] == ["word"] and decision.preempted == ("essay",)
    _decode(scheduler, ["word"], 0.4)
    # started, the short one still outranks the essay: its class's index is far higher
    assert [w.request_id for w in scheduler.schedule(0.4, limits).scheduled] == ["word"]


def test_without_prompt_notes_it_schedules_exactly_as_las_adaptive(predictor: PromptLengthPredictor) -> None:
    prompts, lengths = _predictable(150, seed=5)
    arrivals = gamma_arrivals(2.5, 4.0, len(prompts), seed=6)
    blind = [WorkloadItem(float(a), len(p), n) for a, p, n in zip(arrivals, prompts, lengths)]
    prior = tuple(n for c in predictor.class_lengths for n in c)
    config = AdaptiveLASConfig(prior_lengths=prior)
    limits = BatchLimits(max_batch_size=4)
    with_predictor = simulate(PredictedLAS(predictor, config), blind, TIME, limits)
    without = simulate(AdaptiveLAS(config), blind, TIME, limits)
    assert with_predictor == without


def test_on_prompts_that_carry_their_length_it_beats_las_adaptive_on_the_mean_at_a_like_p99(
        predictor: PromptLengthPredictor) -> None:
    prompts, lengths = _predictable(400, seed=7)
    limits = BatchLimits(max_batch_size=4)
    capacity = limits.max_batch_size / ((np.mean(lengths) + 1) * TIME(4, 4))  # requests/s with a full batch
    arrivals = gamma_arrivals(0.9 * capacity, 4.0, len(prompts), seed=8)  # 90% load, bursty
    workload = [WorkloadItem(float(a), len(p), n, tuple(p)) for a, p, n in zip(arrivals, prompts, lengths)]
    config = AdaptiveLASConfig(prior_lengths=tuple(n for c in predictor.class_lengths for n in c))

    def jct(scheduler: AdaptiveLAS) -> tuple[float, float]:
        times = [t.finish_s - t.arrival_s for t in simulate(scheduler, workload, TIME, limits)]
        return float(np.mean(times)), float(np.percentile(times, 99))

    (blind_mean, blind_p99), (mean, p99) = jct(AdaptiveLAS(config)), jct(PredictedLAS(predictor, config))
    assert mean < 0.7 * blind_mean  # the express lane: short answers no longer queue behind essays
    assert p99 < 1.2 * blind_p99


class FloodedPredictedLAS(PredictedLAS):
    """Notes every request's prompt itself: "long" is predicted long, every newcomer short."""

    predictor_for_tests: PromptLengthPredictor

    def __init__(self, config: AdaptiveLASConfig) -> None:
        super().__init__(self.predictor_for_tests, config)

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        self.note_prompt(request_id, [*FILLER, LONG if request_id == "long" else SHORT])
        super().add_request(request_id, num_tokens_to_compute, now)


def test_starvation_bound_holds_for_a_request_predicted_long(predictor: PromptLengthPredictor) -> None:
    FloodedPredictedLAS.predictor_for_tests = predictor
    requests = flood_within_the_starvation_bound(
        FloodedPredictedLAS, AdaptiveLASConfig(min_guard_s=0.5, max_guard_s=2.0, guard_slowdown=0.2,
                                               first_token_slots=0))
    assert len(requests) > 100


def test_the_factory_builds_it_with_the_bundled_predictor_and_refuses_misplaced_predictors(
        predictor: PromptLengthPredictor) -> None:
    built = make_scheduler("las-predicted")
    assert isinstance(built, PredictedLAS) and scheduler_name(built) == "las-predicted"
    assert built.predictor.classes >= 2
    mine = make_scheduler("las-predicted", length_predictor=predictor)
    assert isinstance(mine, PredictedLAS) and mine.predictor is predictor
    with pytest.raises(ValueError, match="only 'las-predicted'"):
        make_scheduler("las-adaptive", length_predictor=predictor)
    # las-predicted's own defaults, the first-token guard on, also under a plain LASConfig
    plain = make_scheduler("las-predicted", las=LASConfig(guard_factor=0.5), length_predictor=predictor)
    assert isinstance(plain, PredictedLAS) and plain.config.guard_factor == 0.5
    assert plain.config.first_token_guard_iterations == built.config.first_token_guard_iterations == 10.0


@pytest.mark.parametrize(("share", "words_ahead"), [(1.0, 2), (0.25, 1)])
def test_the_lane_share_caps_how_many_express_requests_go_ahead_of_guarded_ones(
        predictor: PromptLengthPredictor, share: float, words_ahead: int) -> None:
    limits = BatchLimits(max_batch_size=4)
    config = PredictedLASConfig(first_token_slots=0, min_guard_s=0.5, max_guard_s=0.5, guard_slowdown=0.0,
                                express_batch_share=share)
    scheduler = PredictedLAS(predictor, config)
    essays, words = [f"e{i}" for i in range(4)], [f"w{i}" for i in range(4)]
    for rid in essays:
        scheduler.note_prompt(rid, [*FILLER, LONG])
        scheduler.add_request(rid, 1, 0.0)
    for t in range(3):
        scheduler.schedule(t * 0.1, limits)
        _decode(scheduler, essays, t * 0.1 + 0.1)
    for rid in words:
        scheduler.note_prompt(rid, [*FILLER, SHORT])
        scheduler.add_request(rid, 1, 0.3)
    assert [w.request_id for w in scheduler.schedule(0.3, limits).scheduled] == words  # first tokens
    _decode(scheduler, words, 0.4)
    scheduler.schedule(0.4, limits)  # express now, the essays not yet guarded
    scheduler.update(IterationOutcome(0.9, 0.5, {rid: 1 for rid in words}, tuple(words)))
    batch = [w.request_id for w in scheduler.schedule(0.9, limits).scheduled]
    assert all(scheduler.state(rid).guarded for rid in essays)
    # the guarded keep at least half the batch; the lane takes what its share allows of the rest
    assert sum(rid in words for rid in batch) == words_ahead and len(batch) == 4
    assert PredictedLASConfig(express_batch_share=0.25).lane_size(4) == 1
    with pytest.raises(ValueError, match="express_batch_share"):
        PredictedLASConfig(express_batch_share=0.0)


def test_a_guarded_express_request_keeps_its_lane_place_and_the_oldest_guarded_their_half(
        predictor: PromptLengthPredictor) -> None:
    """Measured on the prompt sample: a 4-token answer that the guard marked before it could finish
    left the lane for the back of the guarded queue and waited 85 s behind long answers. The guard
    only ever promotes now; the half of the batch it reserves goes to the oldest guarded."""
    limits = BatchLimits(max_batch_size=4)
    config = PredictedLASConfig(first_token_slots=0, min_guard_s=0.5, max_guard_s=0.5, guard_slowdown=0.0)
    scheduler = PredictedLAS(predictor, config)
    essays, words = [f"e{i}" for i in range(4)], [f"w{i}" for i in range(4)]
    for rid in essays:
        scheduler.note_prompt(rid, [*FILLER, LONG])
        scheduler.add_request(rid, 1, 0.0)
    scheduler.schedule(0.0, limits)
    _decode(scheduler, essays, 0.1)
    for rid in words:
        scheduler.note_prompt(rid, [*FILLER, SHORT])
        scheduler.add_request(rid, 1, 0.1)
    assert [w.request_id for w in scheduler.schedule(0.1, limits).scheduled] == words  # first tokens
    _decode(scheduler, words, 0.2)
    batch = [w.request_id for w in scheduler.schedule(5.0, limits).scheduled]  # long after: all guarded
    assert all(scheduler.state(rid).guarded for rid in essays + words)
    assert batch == ["w0", "w1", "e0", "e1"]  # two words in the lane, the two oldest essays in their half


def test_a_delegating_wrapper_passes_prompts_on(predictor: PromptLengthPredictor) -> None:
    from elastic_llm.scheduling.base import DelegatingScheduler

    prompts, lengths = _predictable(80, seed=9)
    arrivals = gamma_arrivals(1.0, 4.0, len(prompts), seed=10)
    workload = [WorkloadItem(float(a), len(p), n, tuple(p)) for a, p, n in zip(arrivals, prompts, lengths)]
    limits = BatchLimits(max_batch_size=4)
    wrapped = simulate(DelegatingScheduler(PredictedLAS(predictor)), workload, TIME, limits)
    assert wrapped == simulate(PredictedLAS(predictor), workload, TIME, limits)
    blind = [replace(item, prompt_token_ids=()) for item in workload]  # the same requests, no prompts
    assert wrapped != simulate(PredictedLAS(predictor), blind, TIME, limits)


def test_a_prompt_noted_for_a_request_that_leaves_unadded_is_forgotten(predictor: PromptLengthPredictor) -> None:
    scheduler = PredictedLAS(predictor)
    scheduler.note_prompt("x", [*FILLER, LONG])
    scheduler.remove_request("x")  # never added (e.g. refused): the note must not outlive it
    scheduler.add_request("x", 1, 0.0)
    assert scheduler.length_class("x") is None


def test_past_its_class_s_longest_length_a_request_is_ranked_by_the_shared_index(
        predictor: PromptLengthPredictor) -> None:
    scheduler = PredictedLAS(predictor)
    blind = AdaptiveLAS(scheduler.config)  # the same shared index
    scheduler.note_prompt("word", [*FILLER, SHORT])
    for s in (scheduler, blind):
        s.add_request("word", 1, 0.0)
    longest_short, config = max(predictor.class_lengths[0]), scheduler.config
    for attained in (1, 3, 2 * longest_short + 2, 600):
        for s in (scheduler, blind):
            s._entries["word"].attained = attained
        same = scheduler._rank(scheduler._entries["word"]) == blind._rank(blind._entries["word"])
        # within its class's lengths the class ranks it (its level's start decides); past them, the shared index
        assert same == (config.level_start(config.level(attained)) >= longest_short), attained
