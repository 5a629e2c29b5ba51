"""Loading: clear typed errors for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.errors import ModelLoadError, UnsupportedModelError
from elastic_llm.model.loader import load_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_names_supported(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint("llama-gqa-untied"), tmp_path / "gpt2")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*Qwen2ForCausalLM"):
        load_model(ckpt)


def test_corrupt_weights_file(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint("llama-gqa-untied"), tmp_path / "corrupt")
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(ckpt)


def test_truncated_weights_file(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint("llama-gqa-untied"), tmp_path / "truncated")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(ckpt)


def test_weights_that_do_not_match_config(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint("llama-gqa-untied"), tmp_path / "mismatch")
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(ckpt)


def test_missing_tensor(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint("llama-gqa-untied"), tmp_path / "fewer-layers")
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 5  # the file holds 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="lacks tensor 'model.layers.3"):
        load_model(ckpt)
