"""Fixtures of the sharded-replica tests: a tiny checkpoint with uneven AutoTP shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from elastic_llm.planning import ParallelConfig
from tests.conftest import build_tiny_checkpoint

#: 6 query heads over 3 KV heads (M=2: 2 + 1 KV heads), 3 MLP granules of 64 (M=2: 128 + 64),
#: tied embeddings, 3 layers (P=3: one each). Uneven wherever AutoTP can be.
UNEVEN_TIED: dict[str, Any] = dict(model_type="llama", hidden_size=48, head_dim=8,
                                   intermediate_size=192, num_attention_heads=6,
                                   num_key_value_heads=3, tie_word_embeddings=True)


def config(stages: int, degree: int) -> ParallelConfig:
    """One replica of `stages` x `degree`."""
    return ParallelConfig(D=1, P=stages, M=degree, B=8)


@pytest.fixture(scope="session")
def uneven_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random checkpoint of `UNEVEN_TIED`."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("uneven-tied"), "uneven-tied",
                                 seed=1, fields=UNEVEN_TIED)


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Three prompts of different lengths (token ids < 320)."""
    import torch

    generator = torch.Generator().manual_seed(7)
    return [torch.randint(1, 320, (n,), generator=generator).tolist() for n in (5, 13, 2)]


@pytest.fixture(scope="session")
def reference_greedy() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """transformers' greedy continuation of each prompt (eager attention, one at a time)."""

    def run(checkpoint: Path, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
        out = []
        with torch.no_grad():
            for prompt in batch:
                ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                out.append(ids[0, len(prompt):].tolist())
        return out

    return run
