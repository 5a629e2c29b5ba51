"""SamplingParams validation and the (seed, step) randomness contract."""

from __future__ import annotations

import pytest
import torch

from elastic_llm import InvalidRequestError, SamplingParams
from elastic_llm.engine.sampler import sample_tokens, token_seed


def test_defaults_and_normalisation() -> None:
    params = SamplingParams(stop="END", stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert params.stop == ("END",) and params.stop_token_ids == (3, 4)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(temperature=0.5, top_k=1).greedy
    assert SamplingParams.coerce({"max_new_tokens": 5}).max_new_tokens == 5
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_new_tokens=True)  # a bool is not a token count


def test_token_seed_depends_only_on_seed_and_step() -> None:
    assert token_seed(1, 0) == token_seed(1, 0)
    seeds = {token_seed(s, t) for s in range(20) for t in range(50)}
    assert len(seeds) == 1000  # no collisions across nearby seeds and steps


def test_sampling_reproducible_and_respects_top_k_and_top_p() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=generator)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=5, seed=7)
    draws = [sample_tokens(logits, [params], [step])[0] for step in range(200)]
    assert set(draws) <= top5 and len(set(draws)) > 1
    assert draws == [sample_tokens(logits, [params], [step])[0] for step in range(200)]
    peaked = torch.full((1, 10), -10.0)
    peaked[0, 4] = 10.0
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    assert {sample_tokens(peaked, [nucleus], [s])[0] for s in range(50)} == {4}
