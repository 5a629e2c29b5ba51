"""ModelSpec: parameter, byte and KV figures against real model objects and published sizes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.errors import UnsupportedModelError
from elastic_llm.model.spec import DESCRIBED_MODELS, ModelSpec, described_model
from tests.conftest import TINY_CONFIGS


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mha-tied", "qwen2-bias", "llama-odd-mqa"])
def test_param_count_equals_transformers_model(name: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    import json

    from transformers import AutoModelForCausalLM

    checkpoint = tiny_checkpoint(name)
    spec = ModelSpec.from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert spec.total_params == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert spec.bytes_per_param == 4
    assert spec.kv_bytes_per_token_per_layer == 2 * spec.num_kv_heads * spec.head_dim * 4


@pytest.mark.parametrize(("name", "billions"), [("opt-6.7b", 6.7), ("gpt-20b", 20.0), ("llama-30b", 32.5)])
def test_described_models_have_published_sizes(name: str, billions: float) -> None:
    spec = described_model(name)
    assert spec.total_params / 1e9 == pytest.approx(billions, rel=0.05)
    assert not spec.executable or spec.model_type == "llama"


def test_flops_grow_with_context_and_prefill_is_consistent() -> None:
    spec = DESCRIBED_MODELS["opt-6.7b"]
    assert spec.flops_per_token(1000) > spec.flops_per_token(0)
    # ~2 FLOPs per parameter per token for short contexts
    assert spec.flops_per_token(0) == pytest.approx(2 * spec.total_params, rel=0.05)
    one_by_one = sum(spec.flops_per_token(i) for i in range(16))
    assert spec.prefill_flops(16) == one_by_one


def test_rejects_unknown_and_dynamic_rope() -> None:
    base = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=96, vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelSpec.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelSpec.from_hf_config({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="num_heads"):
        ModelSpec.from_hf_config({**base, "num_key_value_heads": 3})
    assert set(TINY_CONFIGS)  # the fixture table is importable without torch work
