"""Our model math and engine against transformers on tiny random checkpoints, token for token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.model.loader import load_model
from tests.conftest import TINY_CONFIGS

NEW_TOKENS = 24


def _reference_greedy(checkpoint: Path, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_equal_transformers(name: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = tiny_checkpoint(name)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (5, 13, 2)]
    engine = LLMEngine(checkpoint)
    # all prompts batched together: continuous batching must not change any request's tokens
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, completion in zip(prompts, completions, strict=True):
        assert list(completion.token_ids) == _reference_greedy(checkpoint, prompt, NEW_TOKENS)


def test_logits_match_transformers_closely(tiny_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoModelForCausalLM

    from elastic_llm.model.kv_cache import KVCache
    from elastic_llm.model.layers import SequenceSlice

    checkpoint = tiny_checkpoint("qwen2-bias")
    ours = load_model(checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.arange(3, 20)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    spec = ours.spec
    cache = KVCache(0, spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32, torch.device("cpu"))
    # prefill in two chunks (10 + 7 tokens): the second attends to the cached first
    got = []
    for lo, hi in ((0, 10), (10, 17)):
        cache.reserve(hi - lo)
        got.append(ours.network(ids[lo:hi], torch.arange(lo, hi), [SequenceSlice(0, hi - lo, cache)],
                                torch.arange(hi - lo)))
        cache.advance(hi - lo)
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-4)
