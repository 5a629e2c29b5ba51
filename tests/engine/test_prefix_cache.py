"""Prefix caching: cached prompt-prefix KV is reused exactly, bounded in memory, and changes no token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.prefix_cache import PrefixCache
from elastic_llm.model.loader import load_model
from elastic_llm.scheduling import BatchLimits


def _reader(tokens: list[int], layers: int = 2, heads: int = 1, dim: int = 2):  # type: ignore[no-untyped-def]
    """KV whose every entry is the token at that position: what a block holds is checkable."""
    calls: list[tuple[int, int]] = []

    def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((start, end))
        span = torch.tensor(tokens[start:end], dtype=torch.float32).view(1, 1, -1, 1)
        keys = span.expand(layers, heads, end - start, dim).clone()
        return keys, -keys
    return read, calls


def test_match_returns_the_longest_cached_whole_block_prefix_below_the_limit() -> None:
    cache = PrefixCache(budget_bytes=1 << 20, block_size=4)
    prompt = list(range(10, 21))  # 11 tokens: two whole blocks
    read, calls = _reader(prompt)
    assert cache.insert(prompt, read) == 2 and calls == [(0, 4), (4, 8)]
    assert cache.insert(prompt, read) == 0 and len(calls) == 2  # nothing read twice

    keys, values = cache.match(prompt + [99], limit=12)  # type: ignore[misc]
    assert keys.shape == (2, 1, 8, 2) and torch.equal(keys[0, 0, :, 0], torch.tensor(prompt[:8]).float())
    assert torch.equal(values, -keys)
    short = cache.match(prompt, limit=7)  # only one whole block below the limit
    assert short is not None and short[0].shape[2] == 4
    assert cache.match(prompt, limit=3) is None
    assert cache.match([10, 11, 12, 0] + prompt[4:], limit=11) is None  # first block differs
    assert cache.tokens_matched == 12


def test_a_block_is_only_found_behind_its_exact_prefix() -> None:
    cache = PrefixCache(budget_bytes=1 << 20, block_size=2)
    first = [1, 2, 3, 4]
    cache.insert(first, _reader(first)[0])
    other = [9, 9, 3, 4]  # the same second block after a different first block
    assert cache.match(other, limit=4) is None
    cache.insert(other, _reader(other)[0])
    keys, _ = cache.match(other, limit=4)  # type: ignore[misc]
    assert keys[0, 0, :, 0].tolist() == [9, 9, 3, 4]
    keys, _ = cache.match(first, limit=4)  # type: ignore[misc]
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 4]


def test_budget_evicts_least_recently_used_later_blocks_first() -> None:
    block_bytes = 2 * (2 * 1 * 2 * 2) * 4  # keys + values of [2 layers, 1 head, 2 tokens, 2 dims] fp32
    cache = PrefixCache(budget_bytes=3 * block_bytes, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    cache.insert(a, _reader(a)[0])
    cache.insert(b, _reader(b)[0])  # 4 blocks > budget: a's later block goes first
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 3
    assert cache.match(a, limit=4)[0].shape[2] == 2  # type: ignore[index]
    assert cache.match(b, limit=4)[0].shape[2] == 4  # type: ignore[index]
    with pytest.raises(ValueError):
        PrefixCache(budget_bytes=0)


def _engine(path: Path, prefix_cache_bytes: int, **kwargs: object) -> LLMEngine:
    return LLMEngine(load_model(path), prefix_cache_bytes=prefix_cache_bytes, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_batch_tokens", [512, 5])
def test_shared_prefixes_reuse_kv_and_change_no_token(tiny_checkpoint: Callable[[str], Path],
                                                     max_batch_tokens: int) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    system = [7, 3, 9, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]  # 18 shared tokens
    prompts = [system + [60, 61, 62], system + [70, 71], system[:11] + [80, 81, 82, 83, 84], system + [90]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=max_batch_tokens)
    results = {}
    for budget in (0, 1 << 20):
        engine = _engine(path, budget, limits=limits)
        results[budget] = [engine.generate([p], params)[0].token_ids for p in prompts]  # one after another
        stats = engine.stats()
        if budget == 0:
            assert stats.prefix_tokens_reused == 0
            computed_without = stats.tokens_computed
        else:
            # whole blocks of 8: 16 of the 18 shared tokens, 8 of the 11 for the third prompt
            assert stats.prefix_tokens_reused == 16 + 8 + 16
            assert stats.tokens_computed == computed_without - stats.prefix_tokens_reused
    assert results[1 << 20] == results[0]


def test_a_follow_up_turn_reuses_the_previous_prompt_and_answer(tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    first = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outputs = {}
    for budget in (0, 1 << 20):
        engine = _engine(path, budget)
        answer = engine.generate([first], params)[0].token_ids
        follow_up = [*first, *answer, 7, 8, 9]  # the conversation so far, then the next message
        outputs[budget] = (answer, engine.generate([follow_up], params)[0].token_ids)
        reused = engine.stats().prefix_tokens_reused
    assert outputs[1 << 20] == outputs[0]
    # KV existed for the prompt and all but the last answer token: 29 positions, 3 whole blocks
    assert reused == 24


def test_a_request_that_reused_a_prefix_exports_and_resumes_exactly(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("qwen2-bias")
    prompt = list(range(5, 30))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    reference = _engine(path, 0).generate([prompt], params)[0].token_ids

    engine = _engine(path, 1 << 20)
    engine.generate([prompt[:20] + [1, 2]], SamplingParams(max_new_tokens=1))  # caches 16 tokens
    engine.add_request("r", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.stats().prefix_tokens_reused == 16
    state = engine.export_request("r")
    other = _engine(path, 0)
    other.resume_request(state)
    while other.has_unfinished():
        other.step()
    assert other.pop_completion("r").token_ids == reference


def test_smollm2_chat_prompts_share_the_system_prompt(smollm2) -> None:  # type: ignore[no-untyped-def]
    tokenizer = smollm2.tokenizer
    first = tokenizer.chat_prompt_ids("What is the capital of France?")
    second = tokenizer.chat_prompt_ids("Why is the sky blue?")
    params = SamplingParams(max_new_tokens=16)
    plain = LLMEngine(smollm2, prefix_cache_bytes=0)
    expected = [plain.generate([p], params)[0].token_ids for p in (first, second)]
    cached = LLMEngine(smollm2)
    got = [cached.generate([p], params)[0].token_ids for p in (first, second)]
    assert got == expected
    # the chat template's system prompt and "user" framing: 24 tokens, three whole blocks of 8
    assert cached.stats().prefix_tokens_reused == 24


def test_prompts_arriving_together_compute_a_shared_prefix_once(tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    shared = list(range(30, 54))  # 24 tokens: three whole blocks
    prompts = [shared + [1, 2, 3], shared + [4, 5], shared[:12] + [6, 7, 8], [9] * 20 + [10]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    plain = _engine(path, 0).generate(prompts, params)
    engine = _engine(path, 1 << 20)
    together = engine.generate(prompts, params)  # one batch: all four scheduled in the first pass
    assert [c.token_ids for c in together] == [c.token_ids for c in plain]
    stats = engine.stats()
    # the second prompt waits one pass and copies the 24 shared tokens; the third shares only one
    # block (8 tokens, below the 16-token threshold) and the fourth nothing: both compute at once
    assert stats.prefills_deferred == 1 and stats.prefix_tokens_reused == 24


def test_a_cache_too_small_for_the_shared_prefix_costs_one_pass_and_no_token(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    shared = list(range(30, 54))
    prompts = [shared + [1, 2, 3], shared + [4, 5]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = [c.token_ids for c in _engine(path, 0).generate(prompts, params)]
    # a budget below one block: nothing is kept, so the follower waits once and then computes it all
    engine = _engine(path, 100)
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    assert engine.stats().prefills_deferred == 1 and engine.stats().prefix_tokens_reused == 0


def test_the_token_budget_goes_to_tokens_that_need_computing(tiny_checkpoint: Callable[[str], Path]) -> None:
    """Prompts that will copy a cached prefix are budgeted for their uncached tokens only, so more
    of them start in one pass (the scheduler is told before it decides: `skip_cached`)."""
    path = tiny_checkpoint("llama-gqa-untied")
    shared = list(range(30, 54))  # 24 tokens: three whole blocks
    prompts = [shared + [60 + i, 70 + i, 80 + i, 90 + i] for i in range(8)]  # 28 tokens each
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    expected = [c.token_ids for c in _engine(path, 0).generate(prompts, params)]
    engine = _engine(path, 1 << 20, limits=BatchLimits(max_batch_size=8, max_batch_tokens=44))
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    first_token_pass: dict[str, int] = {}
    passes = 0
    while engine.has_unfinished():
        passes += 1
        for output in engine.step():
            first_token_pass.setdefault(output.request_id, passes)
    assert [engine.pop_completion(str(i)).token_ids for i in range(8)] == expected
    # pass 1: the first prompt computes all 28 tokens; the second, given a 16-token chunk of the same
    # two blocks, waits for that prefix. Pass 2: the first's decode plus 7 x 4 uncached tokens = 29
    # <= 44. Budgeted at 28 tokens each, only one more would start in pass 2.
    assert first_token_pass == {"0": 1, **{str(i): 2 for i in range(1, 8)}}
    assert engine.stats().prefix_tokens_reused == 7 * 24
