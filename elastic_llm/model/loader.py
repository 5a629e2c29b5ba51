"""`load_model`: a checkpoint name or path -> spec, network, tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elastic_llm.errors import ModelLoadError, UnsupportedModelError
from elastic_llm.model.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from elastic_llm.model.layers import Rotary
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.spec import EXECUTABLE_ARCHITECTURES, ModelSpec
from elastic_llm.model.tokenizer import Tokenizer
from elastic_llm.model.weights import SafetensorsWeights


@dataclass
class LoadedModel:
    """Everything an engine needs of one model."""

    spec: ModelSpec  #: architecture and sizes
    network: LlamaNetwork  #: the weights and the forward pass
    tokenizer: Tokenizer | None  #: None for tokenizer-less test checkpoints
    checkpoint_dir: Path  #: directory of config.json and safetensors
    config: dict[str, Any]  #: the checkpoint's config.json


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """Parse config.json and check that the architecture is one we execute."""
    path = checkpoint_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    supported = ", ".join(sorted(EXECUTABLE_ARCHITECTURES))
    architectures = config.get("architectures") or []
    if architectures and not any(a in EXECUTABLE_ARCHITECTURES for a in architectures):
        raise UnsupportedModelError(
            f"architecture {architectures} is not supported; supported architectures: {supported}"
        )
    return dict(config)


def build_rotary(config: dict[str, Any], spec: ModelSpec) -> Rotary:
    """RoPE for `config`: plain, or scaled with transformers' own frequency functions."""
    if spec.rope_scaling is None:
        exponent = torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim
        return Rotary(1.0 / (spec.rope_theta ** exponent))
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(spec.model_type, **fields)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[spec.rope_scaling.rope_type](hf_config, "cpu")
    return Rotary(inv_freq, float(scaling))


def read_spec(checkpoint_dir: Path, name: str, dtype: torch.dtype = torch.float32
              ) -> tuple[dict[str, Any], ModelSpec]:
    """config.json and the `ModelSpec` of an executable checkpoint (UnsupportedModelError if not)."""
    config = read_config(checkpoint_dir)
    spec = ModelSpec.from_hf_config(config, name=name,
                                    bytes_per_param=torch.tensor([], dtype=dtype).element_size())
    if not spec.executable:
        raise UnsupportedModelError(
            f"model_type {spec.model_type!r} can be planned for but not executed; supported "
            f"architectures: {', '.join(sorted(EXECUTABLE_ARCHITECTURES))}"
        )
    return config, spec


def load_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               load_tokenizer: bool = True, tensors: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Load a Llama-family model by embedded name, checkpoint directory or GGUF file.

    `tensors`: the whole network's parameters as another process holds them
    (`LlamaNetwork.tensors()`), taken instead of reading the weights files; the checkpoint
    directory still gives the config and the tokenizer.

    Raises:
        ModelLoadError: unknown path, unreadable, corrupt or truncated files.
        UnsupportedModelError: an architecture or setting the model math does not implement.
    """
    checkpoint_dir = resolve_checkpoint(name_or_path)
    config, spec = read_spec(checkpoint_dir, Path(os.fspath(name_or_path)).name, dtype)
    if tensors is None:
        weights = SafetensorsWeights(checkpoint_dir)
        network = LlamaNetwork.from_checkpoint(spec, build_rotary(config, spec), weights, device, dtype)
    else:
        network = LlamaNetwork.from_tensors(spec, build_rotary(config, spec), tensors, device, dtype)
    tokenizer = None
    if load_tokenizer and (checkpoint_dir / "tokenizer_config.json").is_file():
        tokenizer = Tokenizer(checkpoint_dir, extra_eos_ids=spec.eos_token_ids)
    return LoadedModel(spec, network, tokenizer, checkpoint_dir, config)
