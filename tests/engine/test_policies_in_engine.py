"""The engine under every scheduling policy: same greedy tokens, KV budget kept, swaps intact."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from elastic_llm import InvalidRequestError, LLMEngine, SamplingParams
from elastic_llm.engine import EngineStats
from elastic_llm.engine.local_executor import LocalExecutor
from elastic_llm.scheduling import (
    FCFS,
    AdaptiveLAS,
    AdaptiveLASConfig,
    BatchLimits,
    GuardedLAS,
    LASConfig,
    LinearPrefillPredictor,
    MLFQConfig,
    PredictedLAS,
    PromptLengthPredictor,
    RequestScheduler,
    ResidencyConfig,
    SchedulerOutput,
    SkipJoinMLFQ,
)

LIMITS = BatchLimits(max_batch_size=3, max_batch_tokens=64)
BUDGET_TOKENS = 110  # device KV budget in tokens: about two requests' worth, so swapping must happen


class TickClock:
    """A clock that advances a fixed tick per reading: quanta expire after a few iterations."""

    def __init__(self, tick: float = 0.004) -> None:
        self.tick, self.now = tick, 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@dataclass(frozen=True)
class Run:
    outputs: dict[str, tuple[int, ...]]
    stats: EngineStats
    budget_bytes: int | None


def _mlfq(skip_join: bool) -> SkipJoinMLFQ:
    config = MLFQConfig(base_quantum_s=0.01, starvation_alpha_s=0.3, skip_join=skip_join)
    return SkipJoinMLFQ(config, LinearPrefillPredictor(0.001, 0.0005) if skip_join else None)


def _workload(n: int = 12) -> Iterator[tuple[str, list[int], SamplingParams]]:
    generator = torch.Generator().manual_seed(11)
    for i in range(n):
        length = int(torch.randint(2, 30, (1,), generator=generator))
        prompt = torch.randint(1, 320, (length,), generator=generator).tolist()
        new_tokens = int(torch.randint(4, 30, (1,), generator=generator))
        yield f"r{i}", prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)


def _serve(model: object, scheduler: RequestScheduler, mode: str | None) -> Run:
    budget = None
    residency = None
    engine = LLMEngine(model, scheduler=scheduler, limits=LIMITS, clock=TickClock())  # type: ignore[arg-type]
    if mode is not None:
        budget = BUDGET_TOKENS * engine.executor.kv_bytes_per_token
        residency = ResidencyConfig(device_budget_bytes=budget, mode=mode, reserve_fraction=0.1)  # type: ignore[arg-type]
        engine = LLMEngine(model, scheduler=scheduler, limits=LIMITS, clock=TickClock(),  # type: ignore[arg-type]
                           residency=residency)
    arrivals = list(_workload())
    outputs: dict[str, tuple[int, ...]] = {}
    peak = 0
    while arrivals or engine.has_unfinished():
        for _ in range(2):  # two arrivals per iteration: requests join a running batch
            if arrivals:
                engine.add_request(*arrivals.pop(0))
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = engine.pop_completion(output.request_id).token_ids
        if budget is not None:
            assert isinstance(engine.executor, LocalExecutor)
            peak = max(peak, engine.executor.device_kv_bytes())
            assert peak <= budget, f"device KV {peak} bytes exceeds the budget of {budget}"
    return Run(outputs, engine.stats(), budget)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Callable[[str], Path]) -> object:
    from elastic_llm.model.loader import load_model

    return load_model(tiny_checkpoint("llama-gqa-untied"))


@pytest.fixture(scope="module")
def reference(model: object) -> Run:
    return _serve(model, FCFS(), None)


class RecordingAdaptiveLAS(AdaptiveLAS):
    """las-adaptive that remembers the largest batch it handed the engine."""

    largest_batch = 0

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        decision = super().schedule(now, limits)
        self.largest_batch = max(self.largest_batch, len(decision.scheduled))
        return decision


class RecordingAloneLAS(AdaptiveLAS):
    """las-adaptive with first tokens alone, counting the iterations that paused started requests for them."""

    alone_iterations = 0

    def _first_tokens_alone(self, chosen: list[str], max_batch_size: int) -> list[str]:
        alone = super()._first_tokens_alone(chosen, max_batch_size)
        self.alone_iterations += len(alone) < len(chosen)
        return alone


#: a falling-hazard prior (half the outputs 1 token, a tenth 200): least attained service, so started
#: requests are preempted, and first tokens run in one extra slot
ADAPTIVE = AdaptiveLASConfig(prior_lengths=(1,) * 50 + (2,) * 20 + (8, 30, 200) * 10,
                             first_token_slots=0.25, min_guard_s=0.05, max_guard_s=0.05)



class RecordingPredictedLAS(PredictedLAS):
    """las-predicted that counts the prompts the engine told it about."""

    noted = 0

    def note_prompt(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        self.noted += 1
        super().note_prompt(request_id, prompt_token_ids)


def _predicted() -> RecordingPredictedLAS:
    """las-predicted with a predictor fitted on the workload's prompts (and more like them), each
    given a length from a falling-hazard pattern: every class is then least attained service, so
    started requests are preempted."""
    prompts = [prompt for _, prompt, _ in _workload(70)]
    pattern = (1, 1, 1, 2, 8, 30, 200)
    predictor = PromptLengthPredictor.fit(prompts, [pattern[i % len(pattern)] for i in range(len(prompts))],
                                          classes=2)
    return RecordingPredictedLAS(predictor, ADAPTIVE)


POLICIES: dict[str, Callable[[], tuple[RequestScheduler, str | None]]] = {
    "mlfq": lambda: (_mlfq(skip_join=False), None),
    "skip-join": lambda: (_mlfq(skip_join=True), None),
    "skip-join+swap": lambda: (_mlfq(skip_join=True), "swap"),
    "skip-join+recompute": lambda: (_mlfq(skip_join=True), "recompute"),
    # las-guard with a length prior: Gittins order, newcomers first, guard after 0.05 s
    "las-guard": lambda: (GuardedLAS(LASConfig(prior_lengths=tuple(range(4, 30)) * 4, min_guard_s=0.05,
                                               max_guard_s=0.05)), None),
    "las-adaptive": lambda: (RecordingAdaptiveLAS(ADAPTIVE), None),
    "las-adaptive-alone": lambda: (RecordingAloneLAS(replace(ADAPTIVE, first_tokens_alone_at=1e-9)), None),
    "las-predicted": lambda: (_predicted(), None),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_same_greedy_tokens_as_fcfs(model: object, reference: Run, policy: str) -> None:
    scheduler, mode = POLICIES[policy]()
    run = _serve(model, scheduler, mode)
    assert run.outputs == reference.outputs
    assert run.stats.preemptions > 0, "the workload must make MLFQ preempt"
    if isinstance(scheduler, RecordingAdaptiveLAS):  # first tokens ran beyond the batch limit
        assert scheduler.largest_batch == LIMITS.max_batch_size + 1
    if isinstance(scheduler, RecordingAloneLAS):  # started requests paused while first tokens ran alone
        assert scheduler.alone_iterations > 0
    if isinstance(scheduler, RecordingPredictedLAS):  # the engine told it every prompt
        assert scheduler.noted == len(reference.outputs)
    if mode == "swap":
        assert run.stats.bytes_swapped_out > 0 and run.stats.bytes_swapped_in > 0
        assert run.stats.tokens_dropped == 0
    if mode == "recompute":
        assert run.stats.tokens_dropped > 0 and run.stats.bytes_swapped_out == 0
        assert run.stats.tokens_computed > reference.stats.tokens_computed


def test_fcfs_never_preempts(reference: Run) -> None:
    assert reference.stats.preemptions == 0
    assert len(reference.outputs) == 12


def test_swap_round_trip_is_bit_identical(model: object) -> None:
    engine = LLMEngine(model, limits=LIMITS)  # type: ignore[arg-type]
    executor = engine.executor
    assert isinstance(executor, LocalExecutor)
    engine.add_request("a", list(range(5, 30)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    before = executor.export_kv("a")
    assert before is not None
    executor.swap_out(["a"])
    assert executor.on_host() == {"a"} and executor.device_kv_bytes() == 0
    executor.prefetch(["a"])
    assert executor.on_host() == frozenset()
    executor.swap_in(["a"])
    after = executor.export_kv("a")
    assert after is not None and after.length == before.length
    for x, y in zip((*before.keys, *before.values), (*after.keys, *after.values), strict=True):
        assert torch.equal(x, y)


def test_residency_needs_a_scheduler_that_estimates(model: object) -> None:
    with pytest.raises(ValueError, match="estimates next scheduled"):
        LLMEngine(model, residency=ResidencyConfig(device_budget_bytes=10**6))  # type: ignore[arg-type]


def test_request_larger_than_the_kv_budget_is_refused(model: object) -> None:
    engine = LLMEngine(model, scheduler=_mlfq(True),  # type: ignore[arg-type]
                       residency=ResidencyConfig(device_budget_bytes=10_000))
    with pytest.raises(InvalidRequestError, match="KV budget"):
        engine.add_request("big", list(range(1, 200)), SamplingParams(max_new_tokens=50))
    assert not engine.has_unfinished()
