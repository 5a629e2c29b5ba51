"""Engine contracts: continuous batching, export/resume, seeded sampling, abort, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_llm import (
    FinishReason,
    InvalidRequestError,
    LLMEngine,
    PromptTooLongError,
    SamplingParams,
    UnknownRequestError,
)
from elastic_llm.scheduling import BatchLimits

GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.9, top_k=50, seed=1234)


@pytest.fixture(scope="module")
def engine_factory(tiny_checkpoint: Callable[[str], Path]) -> Callable[..., LLMEngine]:
    from elastic_llm.model.loader import load_model

    model = load_model(tiny_checkpoint("llama-gqa-untied"))
    return lambda **kw: LLMEngine(model, **kw)


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (int(length),), generator=generator).tolist()
            for length in torch.randint(2, 30, (n,), generator=generator)]


def _run_until_done(engine: LLMEngine, ids: list[str]) -> dict[str, tuple[int, ...]]:
    while engine.has_unfinished():
        engine.step()
    return {i: engine.pop_completion(i).token_ids for i in ids}


def _alone(engine_factory: Callable[..., LLMEngine], prompt: list[int], params: SamplingParams) -> tuple[int, ...]:
    return engine_factory().generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_staggered_arrivals_equal_each_request_alone(engine_factory: Callable[..., LLMEngine],
                                                     params: SamplingParams) -> None:
    prompts = _prompts(6)
    engine = engine_factory(limits=BatchLimits(max_batch_size=4, max_batch_tokens=24))
    ids = [f"r{i}" for i in range(len(prompts))]
    for i, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
        engine.add_request(request_id, prompt, params)
        for _ in range(i):  # later requests join a batch already decoding
            engine.step()
    results = _run_until_done(engine, ids)
    for request_id, prompt in zip(ids, prompts, strict=True):
        assert results[request_id] == _alone(engine_factory, prompt, params)


@pytest.mark.parametrize("include_kv", [True, False], ids=["with-kv", "recompute"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_export_after_k_tokens_and_resume_elsewhere(engine_factory: Callable[..., LLMEngine],
                                                    include_kv: bool, params: SamplingParams) -> None:
    prompts = _prompts(3, seed=11)
    expected = [_alone(engine_factory, p, params) for p in prompts]
    source = engine_factory()
    for i, prompt in enumerate(prompts):
        source.add_request(f"r{i}", prompt, params)
    for _ in range(7):
        source.step()
    states = [source.export_request(f"r{i}", include_kv=include_kv) for i in range(len(prompts))]
    assert not source.has_unfinished()
    for state in states:
        assert 0 < len(state.output_token_ids) < params.max_new_tokens
        assert (state.kv is not None) == include_kv
        if state.kv is not None:
            assert state.kv.length == len(state.prompt_token_ids) + len(state.output_token_ids) - 1
    target = engine_factory()
    for state in states:
        target.resume_request(state)
    results = _run_until_done(target, [s.request_id for s in states])
    for state, want in zip(states, expected, strict=True):
        assert results[state.request_id] == want


def test_chunked_prefill_with_small_token_budget(engine_factory: Callable[..., LLMEngine]) -> None:
    prompt = _prompts(1, seed=5)[0] + _prompts(1, seed=6)[0]
    engine = engine_factory(limits=BatchLimits(max_batch_size=2, max_batch_tokens=5))
    assert engine.generate([prompt], GREEDY)[0].token_ids == _alone(engine_factory, prompt, GREEDY)


def test_unseeded_sampling_gets_a_seed_kept_across_export(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory(seed=99)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.step()
    state = engine.export_request("a")
    assert state.params.seed is not None
    again = engine_factory().generate([[5, 6, 7]], state.params)[0].token_ids
    other = engine_factory()
    other.resume_request(state)
    assert _run_until_done(other, ["a"])["a"] == again


def test_abort_and_unknown_ids(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory()
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.add_request("b", [4, 5, 6], GREEDY)
    engine.step()
    completion = engine.abort("a")
    assert completion.finish_reason is FinishReason.ABORT and len(completion.token_ids) == 1
    with pytest.raises(UnknownRequestError):
        engine.abort("a")
    with pytest.raises(UnknownRequestError):
        engine.export_request("nope")
    assert len(_run_until_done(engine, ["b"])["b"]) == GREEDY.max_new_tokens


def test_max_new_tokens_and_context_window_end_generation(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory()
    short = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert len(short.token_ids) == 3 and short.finish_reason is FinishReason.LENGTH
    window = engine.spec.max_position_embeddings
    near_full = engine.generate([[1] * (window - 4)], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(near_full.token_ids) == 4 and near_full.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_end_generation(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory()
    free = engine.generate([[9, 8, 7]], GREEDY)[0].token_ids
    stop_at = free[5]
    stopped = engine.generate([[9, 8, 7]], SamplingParams(max_new_tokens=20, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == free[: free.index(stop_at) + 1]
    assert stopped.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_sampling_params_are_typed_errors(engine_factory: Callable[..., LLMEngine],
                                              kwargs: dict[str, object], match: str) -> None:
    engine = engine_factory()
    engine.add_request("good", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", [1, 2, 3], kwargs)
    # the engine keeps serving the other request
    assert len(_run_until_done(engine, ["good"])["good"]) == GREEDY.max_new_tokens


def test_bad_prompts_are_typed_errors(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory()
    engine.add_request("good", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("blank", "   ", GREEDY)
    with pytest.raises(InvalidRequestError, match="outside"):
        engine.add_request("oov", [1, 10_000], GREEDY)
    with pytest.raises(PromptTooLongError, match="context window"):
        engine.add_request("long", [1] * engine.spec.max_position_embeddings, GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", [1], GREEDY)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        engine.add_request("text", "hello", GREEDY)  # the tiny checkpoint has no tokenizer
    assert len(_run_until_done(engine, ["good"])["good"]) == GREEDY.max_new_tokens


def test_resume_rejects_kv_of_another_shape(engine_factory: Callable[..., LLMEngine]) -> None:
    engine = engine_factory()
    engine.add_request("a", [1, 2, 3, 4], GREEDY)
    engine.step()
    engine.step()
    state = engine.export_request("a")
    assert state.kv is not None
    from dataclasses import replace

    broken = replace(state, kv=replace(state.kv, keys=state.kv.keys[:-1]))
    with pytest.raises(InvalidRequestError, match="KV state"):
        engine_factory().resume_request(broken)


def test_default_limits_prefill_in_chunks_on_a_cpu(tiny_checkpoint: Callable[[str], Path]) -> None:
    """On a CPU the default token budget is `CPU_BATCH_TOKENS`; given limits are kept."""
    from elastic_llm.model.loader import load_model

    engine = LLMEngine(load_model(tiny_checkpoint("llama-gqa-untied")))
    assert engine.limits == BatchLimits(max_batch_tokens=LLMEngine.CPU_BATCH_TOKENS)
    mine = BatchLimits(max_batch_size=4, max_batch_tokens=4096)
    assert LLMEngine(engine.model, limits=mine).limits == mine


def test_a_resumed_request_keeps_its_time_to_first_token(engine_factory: Callable[..., LLMEngine]) -> None:
    clock = iter(float(t) for t in range(100, 10_000))
    source = engine_factory(clock=lambda: next(clock))
    source.add_request("a", [5, 6, 7], GREEDY)
    source.step()
    state = source.export_request("a")
    assert state.arrival_time is not None and state.first_token_time is not None
    assert state.first_token_time > state.arrival_time  # a real time to first token, not 0
    target = engine_factory()
    target.resume_request(state)
    done = _finish(target, "a")
    assert (done.arrival_time, done.first_token_time) == (state.arrival_time, state.first_token_time)
    # committed elsewhere with no times known: the first token time stays unknown, never 0
    from dataclasses import replace

    unknown = engine_factory()
    unknown.resume_request(replace(state, arrival_time=None, first_token_time=None, kv=None))
    assert _finish(unknown, "a").first_token_time is None


def _finish(engine: LLMEngine, request_id: str) -> Any:
    while engine.has_unfinished():
        engine.step()
    return engine.pop_completion(request_id)
