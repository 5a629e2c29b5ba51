"""The real SmolLM2-135M (9 heads, 3 KV heads) sharded: greedy tokens equal the single-process
engine's and transformers' at (P, M) = (1, 3), (2, 3), (3, 1), reconfigured live in between."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.replica import ShardedExecutor
from tests.replica.conftest import config

pytestmark = pytest.mark.smollm2

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def expected(smollm2: Any) -> list[tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    engine = LLMEngine(smollm2)
    local = [c.token_ids for c in engine.generate(PROMPTS, GREEDY, chat=True)]
    reference = LlamaForCausalLM.from_pretrained(smollm2.checkpoint_dir).eval()
    for prompt, tokens in zip(PROMPTS, local, strict=True):
        ids = engine.encode_prompt(prompt, chat=True)
        with torch.no_grad():
            want = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert list(tokens) == want[0, len(ids):].tolist()
    return local


@pytest.fixture(scope="module")
def executor(smollm2: Any) -> Iterator[ShardedExecutor]:
    with ShardedExecutor(smollm2, config(1, 3)) as shared:
        yield shared


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (3, 1)], ids=lambda s: f"P{s[0]}xM{s[1]}")
def test_greedy_tokens_equal_single_process_engine_and_transformers(
        smollm2: Any, executor: ShardedExecutor, expected: list[tuple[int, ...]],
        shape: tuple[int, int]) -> None:
    report = executor.reconfigure(config(*shape))
    assert report.checkpoint_bytes == 0  # every slice came from a live worker
    engine = LLMEngine(smollm2, executor=executor)
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY, chat=True)] == expected
