"""Shared fixtures: tiny random HF checkpoints (built with transformers) and the real SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Tiny configurations covering the Llama family's variants: GQA ratios, q/k/v bias (Qwen2),
#: tied / untied embeddings, odd sizes, sliding window (Mistral), RoPE scaling types.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-gqa-untied": dict(model_type="llama", hidden_size=64, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-mha-tied": dict(model_type="llama", hidden_size=48, intermediate_size=80,
                           num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-odd-mqa": dict(model_type="llama", hidden_size=54, intermediate_size=70, head_dim=6,
                          num_attention_heads=9, num_key_value_heads=1, tie_word_embeddings=False),
    "llama3-rope": dict(model_type="llama", hidden_size=64, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-linear-rope": dict(model_type="llama", hidden_size=64, intermediate_size=96,
                              num_attention_heads=4, num_key_value_heads=2,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-yarn": dict(model_type="qwen2", hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    "mistral-window": dict(model_type="mistral", hidden_size=64, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
}


def build_tiny_checkpoint(directory: Path, name: str, seed: int = 0,
                          fields: dict[str, Any] | None = None) -> Path:
    """Save a randomly initialised transformers model of `TINY_CONFIGS[name]` (or of `fields`,
    a config of the same form) to `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS[name] if fields is None else fields)
    model_type = fields.pop("model_type")
    fields.setdefault("num_hidden_layers", 3)
    fields.setdefault("vocab_size", 320)
    fields.setdefault("max_position_embeddings", 256)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the default init: sharper, less tie-prone logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: name in TINY_CONFIGS -> path of a saved checkpoint (built once per session)."""
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_checkpoint(tmp_path_factory.mktemp(name), name)
        return built[name]

    return make


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real embedded SmolLM2-135M-Instruct (converted from GGUF on first use, then cached)."""
    import torch

    from elastic_llm.model.loader import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_model("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Streamlit's `AppTest` leaves the page as ``sys.modules["__main__"]``; every process spawned
    later (Dask's worker processes) would then re-run the page and fail to start."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
