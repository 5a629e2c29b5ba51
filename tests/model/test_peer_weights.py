"""A network built from another process's tensors (a peer replica) instead of the weights files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.errors import ModelLoadError
from elastic_llm.model.loader import load_model


@pytest.mark.parametrize("name", ["llama-mha-tied", "qwen2-bias", "llama-gqa-untied"])
def test_a_network_from_peer_tensors_generates_the_same_tokens(tiny_checkpoint: Callable[[str], Path],
                                                               name: str) -> None:
    path = tiny_checkpoint(name)
    source = load_model(path)
    tensors = source.network.tensors()
    tied = source.spec.tie_word_embeddings
    assert ("lm_head.weight" in tensors) is not tied  # a tied head travels once, as the embedding
    copy = load_model(path, tensors=tensors)
    if tied:
        assert copy.network.lm_head.weight is copy.network.embed.weight  # type: ignore[union-attr]
    for mine, theirs in zip(copy.network.parameters(), source.network.parameters(), strict=True):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()  # own memory
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = [[5, 17, 33, 2, 90]]
    assert (LLMEngine(copy).generate(prompt, params)[0].token_ids
            == LLMEngine(source).generate(prompt, params)[0].token_ids)


def test_incomplete_or_misshapen_peer_tensors_are_refused(tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    tensors = load_model(path).network.tensors()
    missing = {k: v for k, v in tensors.items() if k != "layers.1.mlp.down.weight"}
    with pytest.raises(ModelLoadError, match="layers.1.mlp.down.weight missing"):
        load_model(path, tensors=missing)
    misshapen = dict(tensors, **{"norm.weight": torch.ones(3)})
    with pytest.raises(ModelLoadError, match="norm.weight shape"):
        load_model(path, tensors=misshapen)
